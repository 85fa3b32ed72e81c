"""The vector envs a benchmark compares, each with its settings, and the one-env reference.

A :class:`Contender` names one implementation and builds it from a list of env functions.
``SINGLE`` is not a vectorizer: it is one env stepped in the benchmark process, the
reference that efficiency is measured against (see measure.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym

import processes
from checkout import import_fastvec

FastVectorEnv = import_fastvec().FastVectorEnv


@dataclass(frozen=True)
class Contender:
    """One vector-env implementation with its settings."""

    key: str
    label: str
    kind: str  # "single", "sync", "async", "fast", "fast_ready"; subclasses add their own
    kwargs: dict = field(default_factory=dict)

    def build(self, env_fns: list[Callable]) -> gym.vector.VectorEnv:
        if self.kind == "single":
            return InProcessEnv(env_fns[0])
        if self.kind == "sync":
            return gym.vector.SyncVectorEnv(env_fns, **self.kwargs)
        if self.kind == "async":
            return gym.vector.AsyncVectorEnv(env_fns, **self.kwargs)
        if self.kind == "fast":
            return FastVectorEnv(env_fns, **self.kwargs)
        if self.kind == "fast_ready":
            batch = max(1, len(env_fns) // self.kwargs.get("batch_div", 2))
            return FirstReady(FastVectorEnv(env_fns, batch_size=batch))
        raise ValueError(f"unknown contender kind {self.kind!r}")

    def workers(self, num_envs: int) -> int:
        """Worker processes this contender starts for ``num_envs`` envs."""
        if self.kind in ("sync", "single"):
            return 0
        k = self.kwargs.get("envs_per_worker", 1)
        return -(-num_envs // k)

    def describe(self) -> dict:
        return {"key": self.key, "label": self.label, "kind": self.kind,
                "kwargs": dict(self.kwargs)}


SINGLE = Contender("single", "one env in-process", "single")  # the reference, not a vectorizer
SYNC = Contender("sync", "gym Sync", "sync")
ASYNC_SHM = Contender("async_shm", "gym Async shm", "async", {"shared_memory": True})
ASYNC_PIPE = Contender("async_pipe", "gym Async pipe", "async", {"shared_memory": False})
BASELINE = ASYNC_SHM.key  # ratios are taken against this contender


RESUME_ON = "auto"  # the resume setting that keeps the episode log (the default; "off" does not)


def fast(k: int, copy: bool = True, resume: str | None = None) -> Contender:
    """FastVectorEnv with ``k`` envs per worker; ``resume`` None: the constructor's default
    ("auto": the episode log is kept and a lost worker's episodes are replayed)."""
    key = f"fast_k{k}" + ("" if copy else "_nocopy") + (f"_resume_{resume}" if resume else "")
    label = (f"fastvec k={k}" + ("" if copy else " copy=False")
             + (f" resume={resume}" if resume else ""))
    kwargs: dict = {"envs_per_worker": k, "copy": copy}
    if resume is not None:
        kwargs["resume"] = resume
    return Contender(key, label, "fast", kwargs)


def fast_ready(div: int = 2) -> Contender:
    """fastvec with first-ready batches of num_envs // div envs (send/recv)."""
    return Contender(f"fast_ready{div}", f"fastvec first-ready n/{div}", "fast_ready",
                     {"batch_div": div})


class InProcessEnv:
    """One env stepped directly in this process, with a vector env's NEXT_STEP autoreset.

    The reference of a cell: every env of a vector env in that cell replays exactly this
    env's episode (same seed, same actions), so ``min(num_envs, cores)`` times its rate is
    what perfect parallelism would reach.
    """

    num_envs = 1

    def __init__(self, env_fn: Callable):
        self.env = env_fn()
        self._ended = False

    def reset(self, *, seed=None, options=None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        self._ended = False
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self._ended:
            self._ended = False
            return self.env.reset()
        out = self.env.step(action)
        self._ended = bool(out[2] or out[3])
        return out

    def close(self, **kwargs):
        self.env.close()


class FirstReady:
    """FastVectorEnv driven by send/recv instead of lockstep steps.

    ``step(actions)`` returns once ``num_envs`` env-steps came back, from any envs; each env
    is sent again as soon as it returns, so a slow step holds up only its own env. The
    throughput is counted in env-steps like every other contender's.
    """

    def __init__(self, env):
        self.env = env
        self.num_envs = env.num_envs
        self._primed = False

    def reset(self, *, seed=None, options=None):
        self._drain()
        return self.env.reset(seed=seed, options=options)

    def step(self, actions):
        env = self.env
        if not self._primed:
            env.send(actions)
            self._primed = True
        done = 0
        while done < self.num_envs:
            out = env.recv()
            ids = out[-1]
            done += len(ids)
            env.send(actions[ids], ids)
        return out

    def _drain(self) -> None:
        while len(self.env.stepping):
            self.env.recv()
        self._primed = False

    def park(self) -> None:
        """Collect the steps still in flight after a timed sample (untimed): left running,
        they would take cores from whichever contender is timed next."""
        self._drain()

    def worker_pids(self) -> set[int]:
        return processes.worker_pids(self.env)

    def close(self, **kwargs):
        if not kwargs.get("terminate"):
            self._drain()
        self.env.close(**kwargs)
