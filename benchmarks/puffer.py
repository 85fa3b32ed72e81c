"""PufferLib's Multiprocessing vectorizer as a contender, where pufferlib is installed.

PufferLib (``pufferlib`` 3.0 or ``pufferlib-core``) is an optional peer: without it the
contender reports why it is missing and the benchmark goes on. Its vector API, as read from
its source: ``pufferlib.vector.make(creators, env_args, env_kwargs,
backend=pufferlib.vector.Multiprocessing, num_envs=n, num_workers=w, batch_size=b)``; each
creator builds a ``pufferlib.emulation.GymnasiumPufferEnv`` around a gymnasium env and
writes into shared buffers; ``async_reset(seed)`` / ``send(actions)`` / ``recv()`` drive it.

Its workers and its ``recv()`` busy-wait on a flag byte in shared memory without a
deadline: with more busy processes than cores throughput collapses (~100x), and a worker
that dies leaves ``recv()`` spinning forever. So this adapter never enters ``recv()``
before every worker has answered: it waits on the same flags itself, spinning as
PufferLib does, but with a deadline per step and a budget per repeat (from one
``reset()`` to the next); a step that misses either raises ``TimeoutError`` and the
benchmark records it as that contender's error. Its workers also keep spinning for 0.5 s
after their last command, which would steal cores from whichever contender is timed next;
``park()`` waits that out (untimed).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import psutil

from contenders import Contender
from processes import kill_processes

STEP_TIMEOUT_S = 2.0
WORKER_SPIN_S = 0.5  # PufferLib's worker loop spins this long after its last command


def available() -> tuple[bool, str]:
    """(True, version) when PufferLib's vector module imports here, else (False, why)."""
    try:
        import pufferlib
        import pufferlib.emulation  # noqa: F401
        import pufferlib.vector  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        return False, f"{type(exc).__name__}: {exc}".strip()
    return True, getattr(pufferlib, "__version__", "?")


def _puffer_env(env_fn, buf=None, seed=0):
    """A PufferLib creator: the gymnasium env of ``env_fn`` behind PufferLib's emulation."""
    import pufferlib.emulation

    return pufferlib.emulation.GymnasiumPufferEnv(env_creator=env_fn, buf=buf, seed=seed)


class PufferVecEnv:
    """``pufferlib.vector.Multiprocessing`` with a gymnasium-style ``reset``/``step`` and
    deadlines; one batch is every env (``batch_size = num_envs``), as for the others."""

    vec = None  # so that close() works on a half-built object

    def __init__(self, env_fns: list, num_workers: int, repeat_budget_s: float,
                 step_timeout_s: float = STEP_TIMEOUT_S):
        import pufferlib.vector

        n = len(env_fns)
        self.num_envs = n
        self.step_timeout_s = step_timeout_s
        self.repeat_budget_s = repeat_budget_s
        self.vec = pufferlib.vector.make(
            [functools.partial(_puffer_env, fn) for fn in env_fns],
            env_args=[[] for _ in range(n)], env_kwargs=[{} for _ in range(n)],
            backend=pufferlib.vector.Multiprocessing, num_envs=n, num_workers=num_workers,
            batch_size=n,
            overwork=True)  # more workers than cores is what we want to see, not refuse
        self._flags = self.vec.buf["semaphores"]
        self._ready = pufferlib.vector.MAIN  # a flag >= MAIN: the worker answered
        self._budget_end = float("inf")
        self._steps = 0
        self._since = time.monotonic()

    def reset(self, *, seed=None, options=None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        self._budget_end = float("inf")
        self.vec.async_reset(0 if seed is None else int(seed))
        self._wait("reset")
        obs, *_, infos, _ids, _masks = self.vec.recv()
        self._budget_end = time.monotonic() + self.repeat_budget_s
        self._steps, self._since = 0, time.monotonic()
        return obs, infos

    def step(self, actions):
        self.vec.send(np.asarray(actions))
        self._wait("step")
        obs, rew, term, trunc, _teacher, infos, _ids, _masks = self.vec.recv()
        self._steps += 1
        return obs, rew, term, trunc, infos

    def _wait(self, what: str) -> None:
        flags, ready = self._flags, self._ready
        start = time.monotonic()
        deadline = min(start + self.step_timeout_s, self._budget_end)
        while (flags < ready).any():
            now = time.monotonic()
            if now > deadline:
                self._timed_out(what, now, start)

    def _timed_out(self, what: str, now: float, start: float):
        if now - start > self.step_timeout_s:
            raise TimeoutError(f"PufferLib {what} took over {self.step_timeout_s:g} s")
        rate = self._steps * self.num_envs / max(now - self._since, 1e-9)
        raise TimeoutError(f"PufferLib repeat over its budget of {self.repeat_budget_s:g} s "
                           f"after {self._steps} steps ({rate:.0f} env-steps/s)")

    def park(self) -> None:
        """Wait (untimed) until the workers stop spinning on their flags."""
        time.sleep(WORKER_SPIN_S + 0.1)

    def worker_pids(self) -> set[int]:
        return {p.pid for p in getattr(self.vec, "processes", []) if p.pid}

    def close(self, terminate: bool = False, **kwargs):
        """PufferLib's close() always terminates its workers; ``terminate`` is accepted for
        the common close(terminate=...) call and changes nothing."""
        if self.vec is None:
            return
        vec, self.vec = self.vec, None
        procs = list(vec.processes)
        vec.close()  # terminates the workers; it does not join them
        for p in procs:
            p.join(2.0)
        alive = []
        for p in procs:
            if p.exitcode is None:
                try:
                    alive.append(psutil.Process(p.pid))
                except psutil.Error:  # gone meanwhile
                    pass
        kill_processes(alive)
        for p in procs:
            p.join(1.0)


@dataclass(frozen=True)
class PufferContender(Contender):
    """PufferLib Multiprocessing with ``num_workers`` workers (kwargs)."""

    def build(self, env_fns):
        return PufferVecEnv(env_fns, **self.kwargs)

    def workers(self, num_envs: int) -> int:
        return self.kwargs["num_workers"]


def puffer(num_workers: int, repeat_budget_s: float) -> PufferContender:
    return PufferContender(f"puffer_w{num_workers}", f"PufferLib MP, {num_workers} worker"
                           + ("s" if num_workers > 1 else ""), "pufferlib",
                           {"num_workers": num_workers, "repeat_budget_s": repeat_budget_s})
