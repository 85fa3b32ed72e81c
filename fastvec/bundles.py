"""Crash bundles: with ``crash_dir=...``, each failure leaves a directory per env of the
failed worker that says what happened, and that ``fastvec replay`` runs again.

    <crash_dir>/<time>-w<worker>g<generation>-env<i>-<reason>/
        bundle.pkl    everything below, for ``fastvec replay``
        summary.txt   the same for a person, and the command to replay it

A bundle holds the failure (reason, detail, exit code or signal, the worker's traceback),
the request it met (step, reset, call), the env's index and how it was built (the
env_fn, cloudpickled, and a description: ``gym.make(id, ...)`` or ``module:function``),
the episode from the episode log (its start, then its actions, as a replay would use
them: fastvec/episodes.py) and the action of the failed step, the worker's resident
memory and its latest step latencies, and the versions of Python, numpy, gymnasium and
fastvec. Without the episode log (``resume="off"``) there is nothing to replay.

``replay(path)`` builds the env in a child process, restores the episode's start, steps
its actions and then the failed request, and says whether the fault came back and at
which step: "reproduced at step 7: SIGSEGV", "reproduced at step 3: RuntimeError: ...",
"did not reproduce". ``in_process=True`` runs it in the caller, for a debugger.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import pickle
import platform
import signal
import time
import traceback
from dataclasses import dataclass

import cloudpickle
import numpy as np

from fastvec import _ring
from fastvec.layout import unflatten
from fastvec.replay import replay_event, set_rng_state

log = logging.getLogger("fastvec")

FORMAT = "fastvec.bundle/1"
_OPS = {_ring.OP_STEP: "step", _ring.OP_RESET: "reset", _ring.OP_CALL: "call",
        _ring.OP_SET_ATTR: "set_attr", _ring.OP_REPLAY: "replay"}


def _built_by(fn) -> str:
    """How an env_fn builds its env, for a person: a registered id or module:function."""
    fn = getattr(fn, "fn", fn)  # gymnasium's CloudpickleWrapper
    if isinstance(fn, functools.partial):
        args = ", ".join([*map(repr, fn.args), *(f"{k}={v!r}" for k, v in fn.keywords.items())])
        return f"{_built_by(fn.func)}({args})"
    name, module = getattr(fn, "__qualname__", None), getattr(fn, "__module__", None)
    if name and module and "<" not in name:
        return f"{module}:{name}"
    return repr(fn)


def _versions() -> dict:
    import gymnasium

    import fastvec

    return {"python": platform.python_version(), "numpy": np.__version__,
            "gymnasium": gymnasium.__version__, "fastvec": fastvec.__version__}


class CrashBundles:
    """Writes the bundles of one FastVectorEnv's failures (``write`` is called by
    recovery for each failure, before the failed worker's slot is reused)."""

    def __init__(self, crash_dir: str, episodes, views, actions, space):
        self.crash_dir, self.episodes, self.views = crash_dir, episodes, views
        self.actions, self.space = actions, space
        os.makedirs(crash_dir, exist_ok=True)

    def write(self, slot, failure) -> list[str]:
        """One bundle per env of ``slot``; their paths. Never raises: a bundle that cannot
        be written is logged, and the failure is handled as without it."""
        paths = []
        op = _OPS.get(slot.ctl.opcode, str(slot.ctl.opcode))
        for j, i in enumerate(slot.env_indices):
            try:
                paths.append(self._write_one(slot, failure, op, j, i))
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop recovery
                log.warning("could not write the crash bundle of env %d: %s: %s", i,
                            type(exc).__name__, exc)
        return paths

    def _write_one(self, slot, failure, op: str, j: int, i: int) -> str:
        episode = (self.episodes.export(i, b"") if self.episodes is not None
                   else {"why": "resume='off': no episode log to replay"})
        leaves = [None if a is None else np.array(a[i]) for a in self.views.act]
        pickled = (self.actions.pickled or {}).get(i) or {}
        health = slot.health()
        n = min(slot.latency_count, len(slot.latency))
        bundle = {
            "format": FORMAT, "time": time.time(), "reason": failure.reason,
            "detail": failure.detail, "exitcode": failure.exitcode,
            "traceback": failure.remote[1] if failure.remote else None,
            "op": op, "env_index": i, "worker": slot.index, "generation": slot.generation,
            "built_by": _built_by(slot.env_fns[j]),
            "env_fn": cloudpickle.dumps(getattr(slot.env_fns[j], "fn", slot.env_fns[j])),
            "action_space": self.space, "episode": episode,
            "failed_action": [pickled.get(k, leaf) for k, leaf in enumerate(leaves)],
            "rss_bytes": health["rss_bytes"],
            "step_latency_ms": (slot.latency[:n] / 1e6).tolist(),
            "versions": _versions(),
        }
        name = (f"{time.strftime('%Y%m%d-%H%M%S')}-w{slot.index}g{slot.generation}-env{i}-"
                f"{failure.reason}")
        path = os.path.join(self.crash_dir, name)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "bundle.pkl"), "wb") as f:
            pickle.dump(bundle, f)
        with open(os.path.join(path, "summary.txt"), "w") as f:
            f.write(summary(bundle, path))
        return path


def summary(bundle: dict, path: str) -> str:
    ep = bundle["episode"]
    steps = len(ep["reward"]) if "reward" in ep else None
    lines = [
        f"fastvec crash bundle ({bundle['format']})",
        f"failure: {bundle['reason']}: {bundle['detail']}",
        f"in a {bundle['op']} of env {bundle['env_index']} (worker {bundle['worker']}, "
        f"generation {bundle['generation']})",
        f"env built by: {bundle['built_by']}",
        (f"episode: {steps} steps logged, started with {ep['start']}" if steps is not None
         else f"episode: none ({ep['why']})"),
        f"resident memory: {bundle['rss_bytes']} bytes; versions: {bundle['versions']}",
        f"replay: fastvec replay {path}",
    ]
    if bundle["traceback"]:
        lines += ["", "worker traceback:", bundle["traceback"]]
    return "\n".join(lines) + "\n"


# -- replaying a bundle -------------------------------------------------------------------


@dataclass
class Outcome:
    reproduced: bool
    step: int | None  # the episode's step the fault came back at (1-based), or None
    what: str  # "SIGSEGV", "RuntimeError: ...", "hung", or "" (did not reproduce)
    expected_step: int  # the step the bundle's failure happened at
    text: str


def load(path: str) -> dict:
    file = os.path.join(path, "bundle.pkl") if os.path.isdir(path) else path
    with open(file, "rb") as f:
        bundle = pickle.load(f)
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastvec crash bundle ({FORMAT})")
    return bundle


def _steps(bundle: dict) -> tuple[int, int]:
    """(steps the episode had before its replayed part, steps replayed)."""
    ep = bundle["episode"]
    snap = ep.get("snapshot")
    return (0 if snap is None else snap.step), len(ep["reward"])


def run(bundle: dict, progress=lambda step: None) -> None:
    """Rebuild the env, restore the episode and replay it, then the failed request;
    ``progress(step)`` is told each episode step before it runs."""
    ep = bundle["episode"]
    if "start" not in ep:
        raise ValueError(f"this bundle holds no episode to replay: {ep.get('why')}")
    env = cloudpickle.loads(bundle["env_fn"])()
    space = bundle["action_space"]
    start = ep["start"]
    if start.seed is None:
        set_rng_state(env, start.rng)
    kwargs = {} if start.options is None else {"options": start.options}
    env.reset(seed=start.seed, **kwargs)
    skip, n = _steps(bundle)
    if ep.get("snapshot") is not None:
        env.set_state(ep["snapshot"].state)
        if ep["snapshot"].rng is not None:
            set_rng_state(env, ep["snapshot"].rng)
    events = list(ep["events"])
    for t in range(n):
        while events and events[0][0] <= t:
            replay_event(env, events.pop(0))
        extras = ep["extras"].get(t) or {}
        progress(skip + t + 1)
        env.step(unflatten(space, [extras.get(k, leaf[t]) for k, leaf in
                                   enumerate(ep["actions"])]))
    progress(skip + n + 1)
    if bundle["op"] == "step":
        last_terminal = n and (ep["terminated"][-1] or ep["truncated"][-1])
        if last_terminal:  # NEXT_STEP: the failed step was the autoreset
            env.reset()
        else:
            env.step(unflatten(space, bundle["failed_action"]))
    elif bundle["op"] == "reset":
        env.reset()


def _child(bundle: dict, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run(bundle, progress=lambda step: conn.send(("step", step)))
    except Exception as exc:  # noqa: BLE001 - reported as the fault it may be
        conn.send(("raised", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        os._exit(1)
    conn.send(("done",))
    os._exit(0)


def replay(path: str, *, in_process: bool = False, timeout: float = 60.0) -> Outcome:
    """Replay the bundle at ``path``; see the module docstring. ``timeout``: seconds a
    step may take before the replay counts as hung there."""
    bundle = load(path)
    skip, n = _steps(bundle) if "reward" in bundle["episode"] else (0, 0)
    expected = skip + n + 1
    if in_process:
        seen = [None]
        try:
            run(bundle, progress=lambda step: seen.__setitem__(0, step))
        except Exception as exc:  # noqa: BLE001 - the caller sees it in the result
            return _outcome(True, seen[0], f"{type(exc).__name__}: {exc}", expected)
        return _outcome(False, None, "", expected)
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(bundle, child), daemon=True)
    proc.start()
    child.close()
    step, what, done = None, "", False
    try:
        while True:
            if not parent.poll(timeout):
                what = f"hung (no step finished within {timeout:g} s)"
                break
            try:
                msg = parent.recv()
            except EOFError:  # the child died
                break
            if msg[0] == "step":
                step = msg[1]
            elif msg[0] == "raised":
                what = msg[1]
                break
            else:
                done = True
                break
    finally:
        if proc.is_alive() and not done and not what:
            proc.join(5)
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()
    if done:
        return _outcome(False, None, "", expected)
    if not what and proc.exitcode is not None and proc.exitcode < 0:
        what = signal.Signals(-proc.exitcode).name
    elif not what:
        what = f"exited with code {proc.exitcode}"
    return _outcome(True, step, what, expected)


def _outcome(reproduced: bool, step, what: str, expected: int) -> Outcome:
    if not reproduced:
        text = (f"did not reproduce: the episode's {expected - 1} steps and the failed "
                "request ran without a fault")
    else:
        text = f"reproduced at step {step}: {what}"
        if step != expected:
            text += f" (the bundle's failure was at step {expected})"
    return Outcome(reproduced, step, what, expected, text)
