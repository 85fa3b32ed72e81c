"""Benchmark workloads: picklable envs, each described by a name and constructor args.

A :class:`Workload` is a module-level factory plus keyword arguments, so it pickles (fork,
spawn and forkserver alike), and its ``describe()`` is what the results record; building the
same description again gives the same env.

* ``NoopEnv``      pure transport: the step returns a fixed observation, reward 0, and the
                   episode truncates after ``episode_len`` steps.
* ``CpuBoundEnv``  a fixed amount of Python work per step (``iters`` loop iterations,
                   calibrated once in the parent to take about ``ms`` milliseconds), not a
                   sleep: it needs a core, so it shows how well a vectorizer uses the cores.
* ``FaultyEnv``    wraps another workload and, after ``period`` steps in the process that
                   steps it, faults for real: SIGKILL, a segfault, ``os._exit(1)``, an
                   exception, or a hang.
* ``slow_build``   another workload whose construction first sleeps ``seconds`` (a
                   simulator that loads a model or a map): a replacement worker pays it.
* ``gym_env``      a registered gymnasium env (``cartpole()``: CartPole-v1).
* wildfire         ``fastvec.envs.WildfireEnv`` when pyretechnics is importable.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces

FAULT_KINDS = ("segfault", "sigkill", "exit", "raise", "hang")


@dataclass(frozen=True)
class Workload:
    """A named, reproducible env recipe: ``factory(**kwargs)`` builds one env."""

    name: str
    factory: Callable[..., gym.Env]
    kwargs: dict = field(default_factory=dict)
    #: a timed repeat runs at least this many vector steps (an env whose step cost changes
    #: along an episode needs whole episodes to be measured fairly)
    min_steps: int = 0
    #: env i plays the episodes of seed + 7919 i: the envs of a vector env differ from each
    #: other (as in training), every contender still does the same work
    mixed: bool = False

    def env_fn(self, index: int = 0) -> Callable[[], gym.Env]:
        if self.mixed:
            return functools.partial(_seed_offset_env, self.factory, index, self.kwargs)
        return functools.partial(self.factory, **self.kwargs)

    def env_fns(self, num_envs: int) -> list[Callable[[], gym.Env]]:
        return [self.env_fn(i) for i in range(num_envs)]

    def describe(self) -> dict:
        f = self.factory
        kwargs = {k: (v.describe() if isinstance(v, Workload) else v)
                  for k, v in self.kwargs.items()}
        return {"name": self.name, "factory": f"{f.__module__}.{f.__qualname__}",
                "kwargs": kwargs, "min_steps": self.min_steps, "mixed": self.mixed}


class SeedOffset(gym.Wrapper):
    """Shift the reset seed by 7919 x ``offset`` (see ``Workload.mixed``)."""

    def __init__(self, env: gym.Env, offset: int):
        super().__init__(env)
        self.offset = offset

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            seed = seed + 7919 * self.offset
        return self.env.reset(seed=seed, options=options)


def _seed_offset_env(factory: Callable[..., gym.Env], offset: int, kwargs: dict) -> gym.Env:
    return SeedOffset(factory(**kwargs), offset)


# -- no-op ---------------------------------------------------------------------------------------

class NoopEnv(gym.Env):
    """Returns the same observation every step; truncates after ``episode_len`` steps."""

    metadata = {"render_modes": []}

    def __init__(self, obs_shape=(4,), dtype: str = "float32", episode_len: int = 200):
        dt = np.dtype(dtype)
        high = 255 if dt == np.uint8 else 1.0
        self.observation_space = spaces.Box(0, high, tuple(obs_shape), dt)
        self.action_space = spaces.Discrete(2)
        self.episode_len = int(episode_len)
        self._obs = np.zeros(tuple(obs_shape), dt)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs, {}

    def step(self, action):
        self._t += 1
        return self._obs, 0.0, False, self._t >= self.episode_len, {}


def noop(obs_shape=(4,), dtype: str = "float32", episode_len: int = 200) -> Workload:
    shape = "x".join(str(s) for s in obs_shape)
    return Workload(f"noop_{shape}_{np.dtype(dtype).name}", NoopEnv,
                    {"obs_shape": tuple(obs_shape), "dtype": np.dtype(dtype).name,
                     "episode_len": episode_len})


# -- CPU-bound -----------------------------------------------------------------------------------

def _burn(iters: int) -> int:
    x = 0
    for i in range(iters):
        x += i ^ (x & 7)
    return x


@functools.lru_cache(maxsize=None)
def calibrate_iters(ms: float) -> int:
    """Loop iterations of ``_burn`` that take about ``ms`` milliseconds on this core.

    Calibrate in the parent, on an idle machine, and pass the result to the workers: a
    worker that calibrated itself while its siblings compete for the cores would do less
    work per step.
    """
    n = 100_000  # a few ms: long enough to time, short enough to dodge interruptions
    for _ in range(3):
        _burn(n)
    best = min(_timed(_burn, n) for _ in range(9))
    return max(1, int(n * (ms / 1e3) / best))


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class CpuBoundEnv(NoopEnv):
    """A NoopEnv whose step first does ``iters`` iterations of a Python loop (about ``ms``
    ms of one core)."""

    def __init__(self, ms: float = 1.0, obs_shape=(4,), iters: int | None = None,
                 episode_len: int = 200):
        super().__init__(obs_shape, "float32", episode_len)
        self.ms = float(ms)
        self.iters = int(iters) if iters is not None else calibrate_iters(self.ms)

    def step(self, action):
        _burn(self.iters)
        return super().step(action)


def cpu_bound(ms: float = 1.0, obs_shape=(4,), iters: int | None = None) -> Workload:
    iters = calibrate_iters(ms) if iters is None else int(iters)
    return Workload(f"cpu_{ms:g}ms", CpuBoundEnv,
                    {"ms": ms, "obs_shape": tuple(obs_shape), "iters": iters})


def single_env_rate(workload: Workload, seconds: float = 1.0) -> float:
    """Steps per second of one env stepped in this process, without any vectorizer."""
    env = workload.env_fn()()
    try:
        env.reset(seed=0)
        a = env.action_space.sample()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            _, _, term, trunc, _ = env.step(a)
            n += 1
            if term or trunc:
                env.reset()
        return n / (time.perf_counter() - t0)
    finally:
        env.close()


# -- faults ----------------------------------------------------------------------------------------

class InjectedFault(RuntimeError):
    """Raised by FaultyEnv(kind="raise")."""


class FaultyEnv(gym.Wrapper):
    """Wraps ``inner`` and faults for real after ``period`` steps in the stepping process.

    The count starts at 0 in every new process, so a worker that is replaced faults again
    ``period`` steps later (steps a resumed worker replays count: they are steps of its
    env). ``safe_pid`` never faults (the process that built the env functions: vectorizers
    build a throwaway env there to read the spaces). ``stamp``: a file that gets a line
    with ``time.monotonic()`` (one clock for all processes of the machine) just before
    each fault, so that the benchmark can time a recovery from the fault itself.
    """

    def __init__(self, inner: Workload, kind: str, period: int, safe_pid: int | None = None,
                 stamp: str | None = None):
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}, got {kind!r}")
        super().__init__(inner.env_fn()())
        self.kind, self.period, self.safe_pid, self.stamp = kind, int(period), safe_pid, stamp
        self._steps = 0

    def step(self, action):
        self._steps += 1
        if self._steps >= self.period and os.getpid() != self.safe_pid:
            self._fault()
        return self.env.step(action)

    def _fault(self) -> None:
        kind = self.kind
        if self.stamp:
            write_stamp(self.stamp)
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "segfault":
            ctypes.string_at(0)  # reads address 0: SIGSEGV in native code
        elif kind == "exit":
            os._exit(1)
        elif kind == "raise":
            raise InjectedFault(f"injected fault after {self._steps} steps")
        elif kind == "hang":
            threading.Event().wait()  # blocks forever without using a core


def faulty(inner: Workload, kind: str, period: int, safe_pid: int | None = None,
           stamp: str | None = None) -> Workload:
    return Workload(f"{inner.name}+{kind}@{period}", FaultyEnv,
                    {"inner": inner, "kind": kind, "period": int(period),
                     "safe_pid": os.getpid() if safe_pid is None else safe_pid,
                     "stamp": stamp}, min_steps=inner.min_steps)


def write_stamp(path: str) -> None:
    """Append ``time.monotonic()`` as a line to ``path`` (one small O_APPEND write: lines of
    several processes never interleave)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{time.monotonic()!r}\n".encode())
    finally:
        os.close(fd)


def read_stamps(path: str) -> list[float]:
    """Every time :func:`write_stamp` wrote into ``path``, oldest first."""
    try:
        with open(path) as f:
            return [float(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


# -- slow to build, and gymnasium's own --------------------------------------------------------

def _slow_build_env(inner: Workload, seconds: float) -> gym.Env:
    time.sleep(seconds)  # a simulator loading its model or map: every new worker pays it
    return inner.env_fn()()


def slow_build(inner: Workload, seconds: float = 1.5) -> Workload:
    """``inner`` whose construction first sleeps ``seconds``."""
    return Workload(f"{inner.name}+build{seconds:g}s", _slow_build_env,
                    {"inner": inner, "seconds": float(seconds)}, min_steps=inner.min_steps)


def make_gym(env_id: str, **kwargs) -> gym.Env:
    return gym.make(env_id, **kwargs)


def gym_env(env_id: str, **kwargs) -> Workload:
    """A registered gymnasium env, built with ``gym.make(env_id, **kwargs)``."""
    return Workload(env_id.lower().replace("-", "_"), make_gym, {"env_id": env_id, **kwargs})


def cartpole() -> Workload:
    return gym_env("CartPole-v1")


# -- wildfire --------------------------------------------------------------------------------------

def make_wildfire(**kwargs) -> gym.Env:
    from fastvec.envs.wildfire import WildfireEnv

    return WildfireEnv(**kwargs)


def wildfire_available() -> tuple[bool, str]:
    """(True, "") when fastvec.envs.wildfire imports here, else (False, why)."""
    try:
        importlib.import_module("fastvec.envs.wildfire")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a half-written module
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def wildfire(size: int = 64, min_steps: int = 100, mixed: bool = False, **kwargs) -> Workload:
    """The wildfire env; a timed repeat covers at least ``min_steps`` vector steps from
    ``reset(seed=0)``: a step costs up to 10x more while the fire front is long, so a repeat
    must span a good part of an episode (which lasts up to ``max_steps=100``). ``mixed``:
    every env burns a different landscape (see ``Workload.mixed``)."""
    return Workload(f"wildfire_{size}" + ("_mixed" if mixed else ""), make_wildfire,
                    {"size": int(size), **kwargs}, min_steps=min_steps, mixed=mixed)
