"""The soak's faults: the env that carries them (real faults in every phase of a worker's
life, not only in its steps), the kinds with their timing and the outcome each must give,
and the events that plant them into a running soak (``FaultEvents``, for tests/test_soak.py).

A fault is a command file ``<command_dir>/env<i>.<phase>`` holding one fault kind; the env
reads and deletes it when it reaches that phase, so it fires once, in whichever process
gets there first:

    init    the constructor (planted with a failure: it hits the replacement's build)
    cmd     a step (CounterEnv's own, tests/faults.py), plus the kinds below
    reset   reset(), before any state changes: a reset that raises leaves the episode as it was
    call    a call of ``soak_fault(i, "once")``: so a call re-sent after a replay does not
            fault again (``soak_fault(i, kind)`` carries the fault in its arguments: it
            faults again wherever the call is made again)
    close   close()

Step kinds that make a resumed episode impossible to trust (the replay of a lost worker's
episode, fastvec/replay.py, reads the same command files as the live steps did):

    twice:<kind>  fires in this step and again at the next read: the first step of the
                  replay (or, for an episode with no step yet, the re-sent step itself)
    skew:<n>      no fault: adds n to the sum of actions (obs[2]) behind the log's back,
                  as an env that reads a file would; a later replay ends elsewhere
    pace          ``env<i>.pace`` (not a command: read at every step until removed) holds
                  seconds each step sleeps; a replay of many steps runs past its budget

Workers import this module (spawn unpickles ``SoakEnv`` from it): it imports nothing a
worker does not import anyway (no pytest).
"""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np

from fastvec import WorkerFailure
from faults import CounterEnv, do_fault, take_command


# -- the faults, their timing and what each must come back as ------------------------------
N_ENVS = 6
HEARTBEAT_TIMEOUT = 1.0
STEP_TIMEOUT = 2.0  # also a replay's time budget
START_TIMEOUT = 6.0
CLOSE_TIMEOUT = 2.0
RECYCLE_EPISODES = 5  # episodes last 20..60 steps: 6 envs recycle every ~35 steps
MAX_REPLAY_STEPS = 45  # a fault late in a long episode: "too long", truncated
# A replay may take one hang bound (STEP_TIMEOUT) plus twice the slowest request its slot
# completed per step replayed: a paced replay (PACE s per step, >= 25 steps) overruns that
# on a slot whose slowest request took at most SLOWEST (none of the soak's slow steps)
PACE = 1.0
SLOWEST = 0.1
WATCH = min(0.25, HEARTBEAT_TIMEOUT / 4, STEP_TIMEOUT / 4)  # the watchdog's period
SLACK = 3.0  # the parent's own work and scheduling on a loaded 2-core machine
SEED = 2026

STEP_KINDS = ("sigkill", "sigstop", "segfault", "exit", "sleep", "busy", "exception", "slow:0.4")
UNTRUSTED_KINDS = ("twice:segfault", "twice:exception", "skew", "pace", "toolong")
INIT_KINDS = ("exception", "exit", "sigkill", "sigstop", "sleep", "slow:3.0")
RESET_KINDS = ("sigkill", "sleep", "valueerror", "none")
CALL_KINDS = ("sigkill", "sleep", "busy", "own", "none", "once:sigkill", "once:busy")
PHASES = ("step", "step", "untrusted", "reset", "call", "recycle")
TOLERATED = ("slow:0.4", "slow:3.0")  # legal, only slow: must not be touched
REASON = {"sigkill": "died", "segfault": "died", "exit": "died", "sigstop": "frozen",
          "sleep": "hung", "busy": "hung", "exception": "exception",
          "twice:segfault": "died", "twice:exception": "exception", "skew": "died",
          "pace": "died", "toolong": "died"}


def detect_s(kind: str) -> float:
    """How long the parent may take to notice a fault (or sit out a slow step)."""
    kind = kind.removeprefix("once:").removeprefix("twice:")
    if kind == "sigstop":
        return HEARTBEAT_TIMEOUT + WATCH
    if kind in ("sleep", "busy"):
        return STEP_TIMEOUT + WATCH
    if kind.startswith("slow:"):
        return float(kind[5:])
    return 0.0



def why_kind(reason: str) -> str:
    """The kind of truncation a ``worker_restart_reason`` reports."""
    _, resumed, why = reason.partition("; not resumed: ")
    if not resumed:
        # resume off, a phase it does not cover, or a crash that repeats
        return "crash repeated" if "(again, " in reason else "not covered"
    why = why.split(" (", 1)[0]  # an earlier failure's own reason follows in parentheses
    for key, kind in (("diverged", "diverged"), ("time budget", "over budget"),
                      ("max_replay_steps", "too long"), ("raised", "raised")):
        if key in why:
            return kind
    return "nothing to replay"


class Deck:
    """Deals kinds in shuffled rounds: every kind comes up once per round, so a run of any
    length past a few rounds has tried them all (uniform draws skip some by chance)."""

    def __init__(self, kinds, rng):
        self.kinds, self.rng, self.left = list(kinds), rng, []

    def draw(self) -> str:
        if not self.left:
            self.left = [str(k) for k in self.rng.permutation(self.kinds)]
        return self.left.pop()



class InjectedError(Exception):
    """An exception type of the env's own, which a call must propagate as it is."""


def fire(kind: str) -> None:
    """do_fault, plus the exception types the soak expects back from reset() and call()."""
    if kind == "valueerror":
        raise ValueError("injected fault: ValueError in reset")
    if kind == "own":
        raise InjectedError("injected fault: the env's own exception in a call")
    do_fault(kind)


def plant(command_dir: str, index: int, phase: str, kind: str) -> None:
    """Write the command file whole (a rename), so no env ever reads it half written."""
    path = os.path.join(command_dir, f"env{index}.{phase}")
    with open(path + ".tmp", "w") as f:
        f.write(kind)
    os.replace(path + ".tmp", path)


def unplant(command_dir: str, index: int, phase: str) -> None:
    """Remove a file that is read without being removed (``pace``)."""
    try:
        os.unlink(os.path.join(command_dir, f"env{index}.{phase}"))
    except FileNotFoundError:
        pass


def take(command_dir: str | None, index: int, phase: str) -> str | None:
    """The command planted for this phase, removed; None if there is none."""
    return take_command(command_dir, index, phase)


class SoakEnv(CounterEnv):
    """CounterEnv that also faults in its constructor, reset(), close() and a call, and
    whose steps take the kinds above."""

    def __init__(self, command_dir: str | None = None, index: int = 0):
        super().__init__(command_dir, index)
        self._fire("init")

    def reset(self, *, seed=None, options=None):
        self._fire("reset")
        return super().reset(seed=seed, options=options)

    def close(self):
        self._fire("close")
        super().close()

    def soak_fault(self, index: int, kind: str) -> int:
        if index == self.index:
            if kind == "once":
                self._fire("call")
            elif kind != "none":
                fire(kind)
        return self.index

    def _maybe_fault(self):  # CounterEnv.step's hook, before the step changes anything
        if not self.command_dir:
            return
        try:
            with open(os.path.join(self.command_dir, f"env{self.index}.pace")) as f:
                time.sleep(float(f.read()))
        except FileNotFoundError:
            pass
        kind = take(self.command_dir, self.index, "cmd")
        if kind is None:
            return
        if kind.startswith("twice:"):
            plant(self.command_dir, self.index, "cmd", kind[6:])
            kind = kind[6:]
        if kind.startswith("skew:"):
            self.skew(float(kind[5:]))
            return
        do_fault(kind)

    def skew(self, n: float) -> None:
        """Change the env's state behind the episode log's back (the soak's reference
        applies the same change to its mirror)."""
        self._state[2] += n

    def _fire(self, phase: str) -> None:
        kind = take(self.command_dir, self.index, phase)
        if kind is not None:
            fire(kind)


# -- the events: faults planted into a running soak -----------------------------------------
class FaultEvents:
    """The soak's five kinds of fault event, mixed into test_soak.Soak: they plant a fault,
    make the call that meets it (or leave that to the next step, via ``pending``) and hold
    what comes back against what the fault must give. They use the soak's env, reference
    (``ref``), rng, command ``dir``, ``decks``, ``clock``, ``pending``, ``expected``
    restarts, ``recycle_init``, ``after_step``, ``slowed`` and its methods ``free``, ``step``,
    ``count``, ``tally``, ``ceiling``, ``exact``, ``recycled``, ``generations`` and
    ``check_restarts``."""

    def with_init(self, i: int, replaced: bool) -> str | None:
        """Half the time, make the replacement of env i fault while it builds."""
        if not replaced or self.rng.random() < 0.5:
            return None
        kind = self.decks["init"].draw()
        plant(self.dir, i, "init", kind)
        self.count("init", kind)
        return kind

    def plan(self, i: int, kind: str, replaced: bool, init: str | None, phase: str,
             extra: float = 0.0):
        """(fault description, bound of the call that answers it); counts its restarts."""
        rounds = int(replaced) + int(init is not None and init not in TOLERATED)
        self.expected[i] += rounds
        self.check_due = True
        fault = f"{phase}:{kind} in env {i}" + (f", then init:{init}" if init else "")
        return fault, detect_s(kind) + rounds * START_TIMEOUT + SLACK + extra

    def expect(self, i: int, kind: str) -> set:
        """What a step fault of ``kind`` in env i must come back as: "resumed", or the kind
        of its truncation (why_kind)."""
        m = self.ref.m[i]
        if not self.resume:
            return {"not covered"}
        if not m.logged:
            return {"nothing to replay"}  # its episode ended truncated: a fresh one now
        if m.t > MAX_REPLAY_STEPS:
            return {"too long"}
        if kind == "twice:exception":  # raised in the replay, or (nothing to replay)
            return {"raised"} if m.t else {"crash repeated"}  # in the re-sent step
        planted = {"twice:segfault": "crash repeated", "skew": "diverged",
                   "pace": "over budget"}
        if kind in planted:
            return {planted[kind]}
        # A call that raised the env's own exception is logged and replayed, so the
        # replay raises too and the episode ends truncated, though it would replay
        # exactly (a fastvec bug, reported with issue 16): resuming would be right too.
        return {"resumed", "raised"} if m.own else {"resumed"}

    def kill(self, i: int, sig=signal.SIGKILL) -> None:
        os.kill(self.workers()[i]["pid"], sig)

    # -- the five kinds of event ---------------------------------------------------------
    def step_fault(self) -> tuple[str, float]:
        kind = self.decks["step"].draw()
        # An env whose next step is its autoreset calls reset(), not step(), so a fault
        # planted in its step would fire a step late: pick another env.
        inside = kind not in ("sigkill", "sigstop")
        due = np.array([m.due for m in self.ref.m])
        candidates = np.flatnonzero(self.free() & ~(due & inside))
        if not len(candidates):
            return "none", SLACK
        i = int(self.rng.choice(candidates))
        init = self.with_init(i, kind not in TOLERATED)
        self.pending[i] = ("step", kind, self.expect(i, kind))
        self.count("step", kind)
        if kind in TOLERATED:  # its slot's slowest request: replays of it get longer
            self.slowed.append(self.ref.m[i])
        if inside:
            plant(self.dir, i, "cmd", kind)
        else:
            self.kill(i, signal.SIGKILL if kind == "sigkill" else signal.SIGSTOP)
        return self.plan(i, kind, kind not in TOLERATED, init, "step")

    def untrusted_fault(self) -> tuple[str, float]:
        """A step fault whose episode the replay must refuse to resume."""
        kind = self.decks["untrusted"].draw()
        ok = {"twice:segfault": lambda m: not m.due and m.t <= MAX_REPLAY_STEPS,
              "twice:exception": lambda m: not m.due and m.t <= MAX_REPLAY_STEPS,
              "skew": lambda m: not m.due and m.t < MAX_REPLAY_STEPS,
              "pace": lambda m: 25 <= m.t <= MAX_REPLAY_STEPS and m not in self.slowed,
              "toolong": lambda m: m.t > MAX_REPLAY_STEPS}[kind]
        candidates = [i for i in np.flatnonzero(self.free())
                      if ok(self.ref.m[i]) and self.ref.m[i].logged and not self.ref.m[i].own]
        if not candidates:
            return "none", SLACK
        i = int(self.rng.choice(candidates))
        if kind == "skew":  # a step the log does not explain, then the worker is lost
            plant(self.dir, i, "cmd", "skew:7")
            self.ref.m[i].skew = 7.0
            self.step(f"skew:7 in env {i}", SLACK)
            if not self.free()[i]:
                return "none", SLACK  # its worker was recycled in that step
        self.count("untrusted", kind)
        init = self.with_init(i, True)
        self.pending[i] = ("step", kind, self.expect(i, kind))
        # the crash repeats: a second replacement
        extra = START_TIMEOUT if "crash repeated" in self.pending[i][2] else 0.0
        if kind.startswith("twice:"):
            plant(self.dir, i, "cmd", kind)
        else:
            if kind == "pace":
                plant(self.dir, i, "pace", str(PACE))
                self.after_step.append(functools.partial(unplant, self.dir, i, "pace"))
                # the replay runs to its budget, then ends the step it is in
                extra = STEP_TIMEOUT + 2 * SLOWEST * self.ref.m[i].t + PACE
            self.kill(i)
        return self.plan(i, kind, True, init, "untrusted", extra)

    def reset_fault(self) -> None:
        kind = self.decks["reset"].draw()
        i = int(self.rng.choice(np.flatnonzero(self.free())))
        replaced = kind in ("sigkill", "sleep")
        init = self.with_init(i, replaced)
        mask = self.rng.random(N_ENVS) < 0.5
        mask[i] = True
        seeded = self.rng.random() < 0.5
        seeds = [int(s) if seeded and m else None
                 for s, m in zip(self.rng.integers(0, 2**31, N_ENVS), mask)]
        if kind != "none":
            plant(self.dir, i, "reset", kind)
        self.count("reset", kind)
        fault, bound = self.plan(i, kind, replaced, init, "reset")
        fault += " (seeded)" if seeded else " (no seeds)"
        # A reset with a seed loses nothing; one without replays the episode first, so
        # that its reset draws from the RNG the env had.
        accept = {"resumed"} if seeded and self.resume else self.expect(i, kind)
        gens = self.generations(self.workers())
        recycled = set()
        if kind == "valueerror":
            err = None
            with self.clock.call("reset", fault, self.ceiling(bound)):
                try:
                    self.env.reset(seed=seeds, options={"reset_mask": mask})
                except ValueError as exc:
                    err = exc
            recycled = self.recycled(self.workers())
            self.clock.check("reset", fault, self.exact(bound, bool(recycled)))
            assert type(err) is ValueError and "injected" in str(err), repr(err)
            self.ref.fail_reset(seeds, mask, i)  # the other envs did reset
            # The workers live on and the loop goes on: it makes the reset again.
            fault, bound = f"the reset again after {fault}", SLACK
        with self.clock.call("reset", fault, self.ceiling(bound)):
            obs, infos = self.env.reset(seed=seeds, options={"reset_mask": mask})
        health = self.workers()
        again = self.recycled(health)
        recycled |= again
        self.clock.check("reset", fault, self.exact(bound, bool(again)))
        now = self.generations(health)
        changed = {j: g for j, g in now.items() if g != gens[j]}
        assert set(changed) <= {i} | recycled, f"workers {changed} replaced in {fault}"
        outcomes = self.ref.check_reset(f"reset ({fault})", seeds, mask, obs, infos, changed)
        for j, (what, reason) in outcomes.items():
            if j != i or not replaced:
                assert what == "ok", f"env {j} {what} ({reason}) in {fault}"
                continue
            assert what != "ok" and reason.startswith(REASON[kind]), (what, reason, fault)
            label = "resumed" if what == "resumed" else why_kind(reason)
            assert label in accept, f"env {i}: {fault} came back {what} ({reason}); " \
                                    f"expected {sorted(accept)}"
            if what == "resumed":
                self.tally("resumed", "reset")
            else:
                self.tally("truncated", f"reset:{label}")
            self.expected[i] += "(again, " in reason
        self.check_restarts(fault)

    def call_fault(self) -> str:
        kind = self.decks["call"].draw()
        i = int(self.rng.choice(np.flatnonzero(self.free())))
        once, inner = kind.startswith("once:"), kind.removeprefix("once:")
        replaced = inner in ("sigkill", "sleep", "busy")
        init = self.with_init(i, replaced)
        self.count("call", kind)
        fault, bound = self.plan(i, kind, replaced, init, "call")
        if once:
            plant(self.dir, i, "call", inner)
        # With resume the call is re-sent after a replay: a fault in its arguments repeats
        repeat = detect_s(inner) + START_TIMEOUT if replaced and not once else 0.0
        accept = self.expect(i, inner) if once or not self.resume else {"crash repeated"}
        before = self.workers()[i]
        got = err = None
        with self.clock.call("call", fault, self.ceiling(bound + repeat)):
            try:
                got = self.env.call("soak_fault", i, "once" if once else inner)
            except (InjectedError, WorkerFailure) as exc:
                err = exc
        again = isinstance(err, WorkerFailure) and "(again, " in err.detail
        self.clock.check("call", fault, self.exact(bound + repeat * again, True))
        if inner == "none":
            assert err is None and got == tuple(range(N_ENVS)), (got, err)
        elif inner == "own":
            assert type(err) is InjectedError, repr(err)
            self.ref.m[i].own = True
        elif err is None:  # a replacement replayed the episode, the call was re-sent
            assert once and self.resume and got == tuple(range(N_ENVS)), (kind, got)
            after = self.workers()[i]
            if after["resumed"] > before["resumed"]:
                assert "resumed" in accept, f"env {i} resumed in {fault}; expected {accept}"
                self.tally("resumed", "call")
            else:  # its episode could not be resumed: the next step reports it
                assert after["not_resumed"] != before["not_resumed"], (before, after)
                self.pending[i] = ("call", kind, accept - {"resumed"})
        else:  # the next step reports the env truncated
            assert type(err) is WorkerFailure, repr(err)
            assert err.env_index == i and err.reason == REASON[inner], repr(err)
            assert not (self.resume and once), f"{fault}: not answered after a replay: {err!r}"
            assert again == self.resume, f"{fault}: {err!r}"  # the re-sent call faults again
            self.expected[i] += again
            self.pending[i] = ("call", kind, accept)
        self.check_restarts(fault)
        return fault

    def recycle_fault(self) -> str:
        """A build fault for the worker that its env's next episode end recycles."""
        episodes = np.array([h["episodes"] for h in self.workers()])
        candidates = np.flatnonzero(self.free() & (episodes == RECYCLE_EPISODES - 1))
        if not len(candidates):
            return "none"
        i = int(self.rng.choice(candidates))
        kind = self.decks["init"].draw()
        plant(self.dir, i, "init", kind)
        self.recycle_init[i] = kind
        self.count("init_recycle", kind)
        return f"init:{kind} in env {i}'s recycling (pending)"
