"""Long fault-injection soak: ``pytest -m soak`` (FASTVEC_SOAK_SECONDS sets the duration,
split over fork and spawn).

Random real faults hit random envs in every phase of a worker's life (tests/soak_faults.py):

    step   SIGKILL and SIGSTOP from outside; from inside a segfault, os._exit, an endless
           sleep, a busy loop, an exception, or a slow step that must NOT be touched
    init   the replacement built after a failure, or to recycle a worker, raises, exits,
           SIGKILLs or SIGSTOPs itself, hangs (start_timeout ends it), or takes longer than
           step_timeout but less than start_timeout (tolerated: no second restart)
    reset  a masked reset() while one env's reset SIGKILLs itself or hangs (flagged in the
           reset's infos) or raises ValueError (reaches the loop as a ValueError)
    call   a call() while one env SIGKILLs itself or never returns (an endless sleep or busy
           loop: step_timeout ends it), each a WorkerFailure whose env the next step
           reports truncated; or raises its own exception type (reaches the loop as is)
    close  at the end one env's close() hangs and another's segfaults

and workers are recycled every few episodes all along. Checked: every transition of every
env against the CounterEnv rules (no lost, duplicated or misread step); every flag and
restart against the faults planted; every blocking call of the parent against a bound
computed from its timeouts and the fault in flight (SIGALRM ends a call that overruns, so
a hang fails the run too, naming the call and the fault); and at the end no leaked
segments, semaphores, fds or processes, and bounded RSS growth.

The budget never runs out there; test_soak_disable, short, spends it on purpose
(on_budget_exhausted="disable") and has resets bring the envs back.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import signal
import time

import numpy as np
import psutil
import pytest

from conftest import my_leftovers, wait_until, worker_children
from fastvec import FastVectorEnv, WorkerFailure
from faults import CounterEnv
from soak_faults import InjectedError, SoakEnv, plant

pytestmark = pytest.mark.soak

N_ENVS = 6
HEARTBEAT_TIMEOUT = 1.0
STEP_TIMEOUT = 2.0
START_TIMEOUT = 6.0
CLOSE_TIMEOUT = 2.0
RECYCLE_EPISODES = 5  # episodes last 20..60 steps: 6 envs recycle every ~35 steps
WATCH = min(0.25, HEARTBEAT_TIMEOUT / 4, STEP_TIMEOUT / 4)  # the watchdog's period
SLACK = 3.0  # the parent's own work and scheduling on a loaded 2-core machine

STEP_KINDS = ("sigkill", "sigstop", "segfault", "exit", "sleep", "busy", "exception", "slow:0.4")
INIT_KINDS = ("exception", "exit", "sigkill", "sigstop", "sleep", "slow:3.0")
RESET_KINDS = ("sigkill", "sleep", "valueerror", "none")
CALL_KINDS = ("sigkill", "sleep", "busy", "own", "none")
PHASES = ("step", "step", "reset", "call", "recycle")
TOLERATED = ("slow:0.4", "slow:3.0")  # legal, only slow: must not be touched
REASON = {"sigkill": "died", "segfault": "died", "exit": "died", "sigstop": "frozen",
          "sleep": "hung", "busy": "hung", "exception": "exception"}


def detect_s(kind: str) -> float:
    """How long the parent may take to notice a fault (or sit out a slow step)."""
    if kind == "sigstop":
        return HEARTBEAT_TIMEOUT + WATCH
    if kind in ("sleep", "busy"):
        return STEP_TIMEOUT + WATCH
    if kind.startswith("slow:"):
        return float(kind[5:])
    return 0.0


def open_fds() -> dict:
    """This process's open file descriptors and what they point to."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            pass
    return out


class CallOverran(KeyboardInterrupt):
    """A blocking call outlived its largest bound.

    A KeyboardInterrupt, because that is the one exception a signal handler can raise
    through fastvec's waits today: posix_ipc's acquire() runs the handler on EINTR and
    replaces any other exception with SignalError, which fastvec's wait loop ignores (a
    fastvec bug: the handler's exception is lost). pytest stops the session on it, with
    this message and the traceback of the call that hung."""


class Clock:
    """Times the parent's blocking calls. SIGALRM at the largest bound a call can have ends
    a hang; the exact bound (which depends on what happened in the call, e.g. a recycle)
    is checked once it returned."""

    def __init__(self):
        self.took = 0.0
        self.calls: dict[str, dict] = {}

    @contextlib.contextmanager
    def call(self, name: str, fault: str, ceiling: float):
        def overran(signum, frame):
            raise CallOverran(f"{name} still blocked after {ceiling:.1f} s, its largest "
                              f"bound; fault in flight: {fault}")

        previous = signal.signal(signal.SIGALRM, overran)
        signal.setitimer(signal.ITIMER_REAL, ceiling)
        t0 = time.monotonic()
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.took = time.monotonic() - t0

    def check(self, name: str, fault: str, bound: float) -> None:
        took = self.took
        rec = self.calls.setdefault(name, {"n": 0, "max_s": 0.0, "bound_s": 0.0, "fault": "",
                                           "max_ratio": 0.0})
        rec["n"] += 1
        if took > rec["max_s"]:
            rec.update(max_s=round(took, 3), bound_s=round(bound, 2), fault=fault)
        rec["max_ratio"] = round(max(rec["max_ratio"], took / bound), 3)
        assert took <= bound, f"{name} took {took:.2f} s > its bound {bound:.2f} s; " \
                              f"fault in flight: {fault}"


class Deck:
    """Deals kinds in shuffled rounds: every kind comes up once per round, so a run of any
    length past a few rounds has tried them all (uniform draws skip some by chance)."""

    def __init__(self, kinds, rng):
        self.kinds, self.rng, self.left = list(kinds), rng, []

    def draw(self) -> str:
        if not self.left:
            self.left = [str(k) for k in self.rng.permutation(self.kinds)]
        return self.left.pop()


class Soak:
    """The loop's state: the env, what was planted, what each env must show next."""

    def __init__(self, env: FastVectorEnv, command_dir: str, rng, clock: Clock, stats: dict):
        self.env, self.dir, self.rng, self.clock, self.stats = env, command_dir, rng, clock, stats
        self.obs = None
        self.fresh = np.zeros(N_ENVS, bool)  # the next step of this env is its reset
        self.pending: dict[int, str] = {}  # env -> fault the next step must answer
        self.expected = np.zeros(N_ENVS, np.int64)  # restarts per env, from the faults
        self.recycles = 0
        self.decks = {name: Deck(kinds, rng) for name, kinds in (
            ("phase", PHASES), ("step", STEP_KINDS), ("init", INIT_KINDS),
            ("reset", RESET_KINDS), ("call", CALL_KINDS))}
        # env -> build fault planted for the recycling of its worker, not yet fired. Other
        # faults leave these envs alone, so that only that recycling can fire it.
        self.recycle_init: dict[int, str] = {}
        self.check_due = False  # the expected restarts changed: compare them after the call
        self.out: set[int] = set()  # envs out of play: their restart budget ran out

    # -- bookkeeping --------------------------------------------------------------------
    def count(self, phase: str, kind: str) -> None:
        by_kind = self.stats["faults"].setdefault(phase, {})
        by_kind[kind] = by_kind.get(kind, 0) + 1

    def recycled(self) -> int:
        """Workers recycled since the last look."""
        total = sum(h["recycles"] for h in self.env.health())
        new, self.recycles = total - self.recycles, total
        return new

    def free(self) -> np.ndarray:
        """Envs that faults may target (no build fault waits for their recycling)."""
        out = np.ones(N_ENVS, bool)
        out[list(self.recycle_init)] = False
        return out

    def recycle_faults_fired(self) -> bool:
        """Count the recycling build faults that fired since the last look; True when one
        failed the build (so a second round of start_timeout)."""
        failed = False
        for i, kind in list(self.recycle_init.items()):
            if not os.path.exists(os.path.join(self.dir, f"env{i}.init")):
                del self.recycle_init[i]
                self.check_due = True
                if kind not in TOLERATED:
                    self.expected[i] += 1
                    failed = True
        return failed

    def ceiling(self, bound: float) -> float:
        """The largest bound a call can have: a recycling round, and a failed build of it."""
        failing = any(k not in TOLERATED for k in self.recycle_init.values())
        return bound + START_TIMEOUT * (1 + failing)

    def exact(self, bound: float, may_recycle: bool) -> float:
        """The bound of the call just made, now that we know whether it recycled workers
        (a round of start_timeout) and whether such a build failed (one more)."""
        recycled = may_recycle and self.recycled() > 0
        return bound + START_TIMEOUT * (recycled + self.recycle_faults_fired())

    def check_restarts(self, fault: str) -> None:
        self.check_due = False
        restarts = np.array([h["restarts"] for h in self.env.health()])
        assert np.array_equal(restarts, self.expected), \
            f"restarts {restarts.tolist()} != {self.expected.tolist()} planted; after {fault}"

    def with_init(self, i: int, replaced: bool) -> str | None:
        """Half the time, make the replacement of env i fault while it builds."""
        if not replaced or self.rng.random() < 0.5:
            return None
        kind = self.decks["init"].draw()
        plant(self.dir, i, "init", kind)
        self.count("init", kind)
        return kind

    def plan(self, i: int, kind: str, replaced: bool, init: str | None, phase: str):
        """(fault description, bound of the call that answers it); counts its restarts."""
        rounds = int(replaced) + int(init is not None and init not in TOLERATED)
        self.expected[i] += rounds
        self.check_due = True
        fault = f"{phase}:{kind} in env {i}" + (f", then init:{init}" if init else "")
        return fault, detect_s(kind) + rounds * START_TIMEOUT + SLACK

    # -- the four kinds of event ---------------------------------------------------------
    def step_fault(self) -> tuple[str, float]:
        kind = self.decks["step"].draw()
        # An env whose next step is its autoreset calls reset(), not step(), so a fault
        # planted in its step would fire a step late: pick another env.
        candidates = np.flatnonzero(self.free() & (~self.fresh if kind not in
                                                   ("sigkill", "sigstop") else True))
        if not len(candidates):
            return "none", SLACK
        i = int(self.rng.choice(candidates))
        init = self.with_init(i, kind not in TOLERATED)
        self.pending[i] = kind
        self.count("step", kind)
        if kind == "sigkill":
            os.kill(self.env.health()[i]["pid"], signal.SIGKILL)
        elif kind == "sigstop":
            os.kill(self.env.health()[i]["pid"], signal.SIGSTOP)
        else:
            plant(self.dir, i, "cmd", kind)
        return self.plan(i, kind, kind not in TOLERATED, init, "step")

    def reset_fault(self) -> None:
        kind = self.decks["reset"].draw()
        i = int(self.rng.choice(np.flatnonzero(self.free())))
        replaced = kind in ("sigkill", "sleep")
        init = self.with_init(i, replaced)
        mask = self.rng.random(N_ENVS) < 0.5
        mask[i] = True
        if kind != "none":
            plant(self.dir, i, "reset", kind)
        self.count("reset", kind)
        fault, bound = self.plan(i, kind, replaced, init, "reset")
        if kind == "valueerror":
            with self.clock.call("reset", fault, self.ceiling(bound)):
                with pytest.raises(ValueError) as err:
                    self.env.reset(options={"reset_mask": mask})
            self.clock.check("reset", fault, self.exact(bound, True))
            assert type(err.value) is ValueError and "injected" in str(err.value), err.value
            # The workers live on and the loop goes on: it makes the reset again.
            fault, bound = f"the reset again after {fault}", SLACK
        prev = self.obs
        with self.clock.call("reset", fault, self.ceiling(bound)):
            obs, infos = self.env.reset(options={"reset_mask": mask})
        self.clock.check("reset", fault, self.exact(bound, True))
        self.obs = obs
        flagged = infos.get("_worker_restarted", np.zeros(N_ENVS, bool))
        want = np.zeros(N_ENVS, bool)
        want[i] = replaced
        assert np.array_equal(flagged, want), f"reset flagged {flagged} after {fault}"
        assert "env_disabled" not in infos, f"env disabled after {fault}"
        if replaced:
            assert infos["worker_restart_reason"][i].startswith(REASON[kind]), infos
            self.stats["flagged"]["reset"] += 1
        for j in range(N_ENVS):
            if mask[j]:
                assert obs[j][1] == 0 and obs[j][2] == 0, f"env {j} not reset after {fault}"
                self.fresh[j] = False
            else:
                np.testing.assert_array_equal(obs[j], prev[j], f"env {j} moved in {fault}")
        self.check_restarts(fault)

    def call_fault(self) -> str:
        kind = self.decks["call"].draw()
        i = int(self.rng.choice(np.flatnonzero(self.free())))
        replaced = kind in ("sigkill", "sleep", "busy")
        init = self.with_init(i, replaced)
        self.count("call", kind)
        fault, bound = self.plan(i, kind, replaced, init, "call")
        with self.clock.call("call", fault, self.ceiling(bound)):
            if kind == "none":
                assert self.env.call("soak_fault", i, kind) == tuple(range(N_ENVS))
            else:
                with pytest.raises((InjectedError, WorkerFailure)) as err:
                    self.env.call("soak_fault", i, kind)
        self.clock.check("call", fault, self.exact(bound, True))
        if kind == "own":
            assert type(err.value) is InjectedError, repr(err.value)
        elif replaced:
            assert type(err.value) is WorkerFailure, repr(err.value)
            assert err.value.env_index == i and err.value.reason == REASON[kind], \
                repr(err.value)
            self.pending[i] = kind  # the next step reports the env truncated
        self.check_restarts(fault)
        return fault

    def recycle_fault(self) -> str:
        """A build fault for the worker that its env's next episode end recycles."""
        episodes = np.array([h["episodes"] for h in self.env.health()])
        candidates = np.flatnonzero(self.free() & (episodes == RECYCLE_EPISODES - 1))
        if not len(candidates):
            return "none"
        i = int(self.rng.choice(candidates))
        kind = self.decks["init"].draw()
        plant(self.dir, i, "init", kind)
        self.recycle_init[i] = kind
        self.count("init_recycle", kind)
        return f"init:{kind} in env {i}'s recycling (pending)"

    # -- the step ------------------------------------------------------------------------------
    def step(self, fault: str, bound: float) -> None:
        stats = self.stats
        if self.recycle_init:
            fault += f"; build faults waiting for recycling: {self.recycle_init}"
        actions = self.rng.integers(0, 5, N_ENVS)
        prev = self.obs
        with self.clock.call("step", fault, self.ceiling(bound)):
            obs, rew, term, trunc, info = self.env.step(actions)
        self.clock.check("step", fault, self.exact(bound, (term | trunc).any()))
        self.obs = obs
        stats["steps"] += 1
        none = np.zeros(N_ENVS, bool)
        flagged = info.get("_worker_restarted", none)
        disabled = info.get("_env_disabled", none)
        for i in range(N_ENVS):
            kind = self.pending.pop(i, None)
            if i in self.out:
                assert disabled[i] and not flagged[i], \
                    f"env {i} is out of play but step {stats['steps']} reported {info}"
                assert kind is None or kind not in TOLERATED
                assert trunc[i] and not term[i] and rew[i] == 0.0
                np.testing.assert_array_equal(obs[i], prev[i])
                stats["out_of_play"] = stats.get("out_of_play", 0) + 1
                continue
            assert not disabled[i], f"env {i} disabled at step {stats['steps']}"
            if flagged[i]:
                assert kind is not None and kind not in TOLERATED, \
                    f"env {i} flagged without a fault at step {stats['steps']}"
                assert info["worker_restart_reason"][i].startswith(REASON[kind]), \
                    f"env {i}: {kind} reported as {info['worker_restart_reason'][i]}"
                if self.fresh[i]:
                    # Lost while its episode had just ended (NEXT_STEP): no episode lost,
                    # the replacement's reset is this very step, flagged.
                    assert not trunc[i] and not term[i] and rew[i] == 0.0, \
                        f"env {i}: a lost worker's reset step at {stats['steps']}"
                    assert obs[i][1] == 0 and obs[i][2] == 0, f"env {i}: expected a reset"
                    stats["flagged"]["reset_step"] += 1
                    self.fresh[i] = False
                    continue
                assert trunc[i] and not term[i] and rew[i] == 0.0
                np.testing.assert_array_equal(obs[i], prev[i])
                stats["flagged"]["step"] += 1
                self.fresh[i] = True
                continue
            assert kind is None or kind in TOLERATED, \
                f"fault {kind} of env {i} was not answered at step {stats['steps']}"
            stats["slow_untouched"] += kind is not None
            if self.fresh[i]:
                assert obs[i][1] == 0 and rew[i] == 0.0, f"env {i}: expected a reset"
            else:
                assert obs[i][0] == prev[i][0] and obs[i][1] == prev[i][1] + 1, \
                    f"env {i}: lost or repeated step at {stats['steps']}"
                assert obs[i][2] == prev[i][2] + actions[i]
                assert rew[i] == actions[i] * 0.5 + obs[i][1]
            self.fresh[i] = term[i] or trunc[i]
            stats["episodes"] += int(term[i])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_soak(tmp_path, context):
    assert STEP_TIMEOUT < float(TOLERATED[1][5:]) < START_TIMEOUT - 2  # a slow build, legal
    seconds = float(os.environ.get("FASTVEC_SOAK_SECONDS", "60")) / 2  # split over contexts
    rng = np.random.default_rng(int(os.environ.get("FASTVEC_SOAK_SEED", "12345")))
    command_dir = str(tmp_path)
    fns = [functools.partial(SoakEnv, command_dir, i) for i in range(N_ENVS)]
    me = psutil.Process()
    FastVectorEnv([CounterEnv], context=context).close()  # multiprocessing's one-time helpers
    fds0 = open_fds()
    clock = Clock()
    stats = {"context": context, "steps": 0, "episodes": 0, "faults": {},
             "flagged": {"step": 0, "reset_step": 0, "reset": 0}, "slow_untouched": 0}
    with clock.call("construct", "none", START_TIMEOUT + SLACK):
        env = FastVectorEnv(fns, context=context, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                            step_timeout=STEP_TIMEOUT, start_timeout=START_TIMEOUT,
                            max_restarts=10**6, restart_window=1.0,
                            recycle_after_episodes=RECYCLE_EPISODES)
    clock.check("construct", "none", START_TIMEOUT + SLACK)
    soak = Soak(env, command_dir, rng, clock, stats)
    try:
        with clock.call("reset", "none", SLACK):
            soak.obs, _ = env.reset(seed=2026)
        clock.check("reset", "none", SLACK)
        rss_base = None
        next_event = 50
        deadline = time.monotonic() + seconds
        while True:  # until the deadline, and every recycling build fault fired
            fault, bound = "none", SLACK
            late = time.monotonic() >= deadline
            if late and not soak.recycle_init:
                break
            if stats["steps"] == next_event and not late:
                phase = soak.decks["phase"].draw()
                if not soak.free().any():
                    pass  # every env waits for its recycling to fire a build fault
                elif phase == "step":
                    fault, bound = soak.step_fault()
                elif phase == "reset":
                    soak.reset_fault()
                elif phase == "call":
                    fault = soak.call_fault()  # a lost worker: the step below reports it
                else:
                    soak.recycle_fault()
                next_event += int(rng.integers(20, 200))
            soak.step(fault, bound)
            if soak.check_due:
                soak.check_restarts(fault if fault != "none" else f"step {stats['steps']}")
            if stats["steps"] == 300:
                gc.collect()
                rss_base = me.memory_info().rss
        health = env.health()
        soak.check_restarts("the last step")
        stats["restarts"] = sum(h["restarts"] for h in health)
        stats["recycles"] = sum(h["recycles"] for h in health)
        stats["rss_growth_mb"] = (me.memory_info().rss - rss_base) / 2**20 if rss_base else 0.0
        assert stats["recycles"] >= stats["steps"] // 200, stats  # recycling went on
        assert wait_until(lambda: len(worker_children()) == N_ENVS, 5.0)  # retired ones gone
        assert stats["rss_growth_mb"] < 50, stats

        # Close while one env's close() hangs and another's segfaults.
        hang, crash = (int(i) for i in rng.choice(N_ENVS, 2, replace=False))
        plant(command_dir, hang, "close", "sleep")
        plant(command_dir, crash, "close", "segfault")
        stats["faults"]["close"] = {"sleep": 1, "segfault": 1}
        fault = f"close:sleep in env {hang}, close:segfault in env {crash}"
        bound = CLOSE_TIMEOUT + 1.0 + SLACK  # ask, then terminate, then kill
        with clock.call("close", fault, bound):
            env.close(timeout=CLOSE_TIMEOUT)
        clock.check("close", fault, bound)
    finally:
        if not env.closed:
            env.close(terminate=True)
    finish(stats, clock, fds0, command_dir)


def finish(stats: dict, clock: Clock, fds0: dict, command_dir: str) -> None:
    """After close: every planted fault fired, nothing leaked; print and file the stats."""
    assert not os.listdir(command_dir), f"faults planted that never fired: " \
                                        f"{os.listdir(command_dir)}"
    assert wait_until(lambda: not my_leftovers() and not worker_children(), 5.0)
    gc.collect()
    wait_until(lambda: open_fds() == fds0, 5.0)
    fds1 = open_fds()
    assert fds1 == fds0, f"fds opened and not closed: {sorted(set(fds1.items()) - set(fds0.items()))}"
    stats["leaks"] = {"shm": my_leftovers(), "fds": len(fds1) - len(fds0),
                      "processes": len(worker_children())}
    stats["calls"] = clock.calls
    print(json.dumps(stats))
    report = os.environ.get("FASTVEC_SOAK_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(stats) + "\n")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_soak_disable(tmp_path, context):
    """The restart budget runs out (on_budget_exhausted="disable"): the env stays in the
    batch, truncated with env_disabled, out of play for steps and calls, until a masked
    reset tries it again, with a fresh budget that tolerates one failed build."""
    rng = np.random.default_rng(int(os.environ.get("FASTVEC_SOAK_SEED", "12345")) + 1)
    command_dir = str(tmp_path)
    fns = [functools.partial(SoakEnv, command_dir, i) for i in range(N_ENVS)]
    FastVectorEnv([CounterEnv], context=context).close()  # multiprocessing's one-time helpers
    fds0 = open_fds()
    clock = Clock()
    stats = {"context": context, "test": "disable", "steps": 0, "episodes": 0, "faults": {},
             "flagged": {"step": 0, "reset_step": 0, "reset": 0}, "slow_untouched": 0, "out_of_play": 0}
    env = FastVectorEnv(fns, context=context, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                        step_timeout=STEP_TIMEOUT, start_timeout=START_TIMEOUT,
                        max_restarts=1, restart_window=600.0, on_budget_exhausted="disable")
    soak = Soak(env, command_dir, rng, clock, stats)
    used = np.zeros(N_ENVS, np.int64)  # restarts counted in each env's budget window
    try:
        soak.obs, _ = env.reset(seed=7)
        for _ in range(6):
            for _ in range(int(rng.integers(3, 30))):
                soak.step("none", SLACK)
            # SIGKILL a worker; its replacement fails to build unless the budget is spent
            # already: either way the second count of the window disables the env.
            i = int(rng.integers(N_ENVS))
            fault, bound = f"disable: SIGKILL of env {i}'s worker", SLACK
            if used[i] == 0:
                plant(command_dir, i, "init", "exception")
                soak.count("init", "exception")
                fault, bound = fault + ", then init:exception", SLACK + START_TIMEOUT
            soak.expected[i] += 2 - used[i]
            soak.count("disable", "sigkill")
            os.kill(env.health()[i]["pid"], signal.SIGKILL)
            soak.out.add(i)
            soak.pending[i] = "sigkill"
            soak.step(fault, bound)
            soak.check_restarts(fault)
            assert env.health()[i]["disabled"]
            for _ in range(int(rng.integers(1, 10))):
                soak.step("none", SLACK)
            fault = f"a call while env {i} is out of play"
            with clock.call("call", fault, SLACK):
                got = env.call("soak_fault", -1, "none")
            clock.check("call", fault, SLACK)
            assert got == tuple(None if j == i else j for j in range(N_ENVS)), got
            # A masked reset tries it again; half the time its first build fails too.
            mask = rng.random(N_ENVS) < 0.5
            mask[i] = True
            fault, bound, used[i] = f"the reset that tries env {i} again", SLACK + START_TIMEOUT, 0
            if rng.random() < 0.5:
                plant(command_dir, i, "init", "exception")
                soak.count("init_reenable", "exception")
                soak.expected[i] += 1
                fault, bound, used[i] = fault + ", init:exception", bound + START_TIMEOUT, 1
            prev = soak.obs
            with clock.call("reset", fault, bound):
                soak.obs, infos = env.reset(options={"reset_mask": mask})
            clock.check("reset", fault, bound)
            assert "_worker_restarted" not in infos and "_env_disabled" not in infos, infos
            for j in range(N_ENVS):
                if mask[j]:
                    assert soak.obs[j][1] == 0 and soak.obs[j][2] == 0, f"env {j} not reset"
                    soak.fresh[j] = False
                else:
                    np.testing.assert_array_equal(soak.obs[j], prev[j])
            soak.out.discard(i)
            soak.check_restarts(fault)
        for _ in range(10):
            soak.step("none", SLACK)
        stats["restarts"] = int(soak.expected.sum())
        bound = CLOSE_TIMEOUT + 1.0 + SLACK
        with clock.call("close", "none", bound):
            env.close(timeout=CLOSE_TIMEOUT)
        clock.check("close", "none", bound)
    finally:
        if not env.closed:
            env.close(terminate=True)
    finish(stats, clock, fds0, command_dir)
