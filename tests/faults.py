"""Envs that inject real faults into their worker process (module level: they pickle under spawn).

Every fault here is real: signals to the worker itself, a null-pointer read, os._exit, an
endless sleep or busy loop, an exception. A fault fires once per marker file, so the
respawned worker (which rebuilds the env from the same env_fn) does not fault again.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

FAULTS = ("sigkill", "exit", "segfault", "sigstop", "sleep", "busy", "exception")


def do_fault(kind: str) -> None:
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit":
        os._exit(3)
    elif kind == "segfault":
        ctypes.string_at(0)
    elif kind == "sigstop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "sleep":
        time.sleep(10**6)
    elif kind == "busy":
        while True:
            pass
    elif kind == "exception":
        raise RuntimeError("injected fault: exception in step")
    elif kind.startswith("slow:"):
        time.sleep(float(kind[5:]))
    else:
        raise ValueError(kind)


def take_command(command_dir: str | None, index: int, suffix: str = "cmd") -> str | None:
    """The command a test wrote to ``<command_dir>/env<index>.<suffix>``, removed (so that
    a replacement does not take it again); None without a file."""
    if not command_dir:
        return None
    path = os.path.join(command_dir, f"env{index}.{suffix}")
    try:
        with open(path) as f:
            kind = f.read().strip()
        os.unlink(path)
    except FileNotFoundError:
        return None
    return kind


def fault_on_command(command_dir: str | None, index: int) -> None:
    """Do the fault a test wrote to ``<command_dir>/env<index>.cmd``, once; nothing without
    a file."""
    kind = take_command(command_dir, index)
    if kind is not None:
        do_fault(kind)


class CounterEnv(gym.Env):
    """Deterministic env whose observation lets a test check every transition.

    obs = [episode_base, t, sum of actions this episode]; reward = action * 0.5 + t.
    Episodes end (terminated) after a length drawn from the reset seed (20..60 steps).
    """

    metadata = {"render_modes": []}

    def __init__(self, command_dir: str | None = None, index: int = 0):
        self.observation_space = spaces.Box(-1e9, 1e9, (3,), np.float64)
        self.action_space = spaces.Discrete(5)
        self.command_dir = command_dir
        self.index = index
        self._state = np.zeros(3)
        self._len = 40

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._len = int(self.np_random.integers(20, 61))
        self._state = np.array([float(self.np_random.integers(0, 10**6)), 0.0, 0.0])
        return self._state.copy(), {}

    def step(self, action):
        self._maybe_fault()
        a = int(action)
        self._state[1] += 1
        self._state[2] += a
        t = self._state[1]
        return self._state.copy(), a * 0.5 + t, bool(t >= self._len), False, {}

    def _maybe_fault(self):
        fault_on_command(self.command_dir, self.index)


class FaultOnceEnv(CounterEnv):
    """CounterEnv that faults at its ``at_step``-th step unless ``marker`` exists."""

    def __init__(self, fault: str, at_step: int, marker: str):
        super().__init__()
        self.fault, self.at_step, self.marker = fault, at_step, marker
        self._steps = 0

    def step(self, action):
        self._steps += 1
        if self._steps == self.at_step and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            do_fault(self.fault)
        return super().step(action)


class AlwaysFailEnv(CounterEnv):
    """Raises in every step: a deterministic bug that must exhaust the restart budget."""

    def step(self, action):
        raise ValueError("deterministic bug")


class BuildFailsAfterFirst:
    """env_fn whose first build works and every later one raises, while ``marker`` exists:
    a replacement that cannot build its env (a port or lock the dead process still held)."""

    def __init__(self, marker: str, kind: str = "raise", delay: float = 0.0):
        self.marker, self.kind, self.delay = marker, kind, delay

    def __call__(self):
        if os.path.exists(self.marker):
            if self.kind == "raise":
                raise OSError(98, "Address already in use (injected: the dead worker's port)")
            if self.kind == "slow":  # a simulator loading its data: slow, but it builds
                time.sleep(self.delay)
            else:
                do_fault(self.kind)
        else:
            open(self.marker, "w").close()
        return CounterEnv()


class ResetFaultEnv(CounterEnv):
    """CounterEnv whose reset raises ValueError for ``options={"bad": True}``, SIGKILLs its
    process once (marker) for ``options={"crash": ...}``, and reports the options it got."""

    def __init__(self, marker: str = ""):
        super().__init__()
        self.marker = marker

    def reset(self, *, seed=None, options=None):
        if options and options.get("bad"):
            raise ValueError("injected: bad reset options")
        if options and options.get("crash") and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            do_fault("sigkill")
        obs, info = super().reset(seed=seed, options=options)
        return obs, {"options": dict(options or {})}


class CallFaultEnv(CounterEnv):
    """CounterEnv with methods that fail when called through ``call()``."""

    def die(self):
        do_fault("sigkill")

    def oops(self):
        raise KeyError("injected: a call that raises")

    def ping(self):
        return self.index


class OneStepEnv(CounterEnv):
    """Episodes of one step; close() leaves a file named after its process, so a test can
    tell that a recycled worker closed its env instead of being SIGKILLed."""

    def __init__(self, close_dir: str = ""):
        super().__init__()
        self.close_dir = close_dir

    def step(self, action):
        obs, reward, _, truncated, info = super().step(action)
        return obs, reward, True, truncated, info

    def close(self):
        if self.close_dir:
            open(os.path.join(self.close_dir, f"closed-{os.getpid()}"), "w").close()


class CloseFaultEnv(CounterEnv):
    """close() hangs or crashes its worker process (never the test process, which builds
    one env itself to read the spaces)."""

    def __init__(self, kind: str = "sleep", parent_pid: int = 0):
        super().__init__()
        self.kind, self.parent_pid = kind, parent_pid

    def close(self):
        if os.getpid() != self.parent_pid:
            do_fault(self.kind)


class UnpicklableInfoEnv(CounterEnv):
    """Returns an info value that cannot be pickled at step ``at``."""

    def __init__(self, at: int = 3):
        super().__init__()
        self.at, self.t = at, 0

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.t += 1
        if self.t == self.at:
            info = {"handle": lambda: None}
        return obs, reward, terminated, truncated, info


class AlarmEnv(CounterEnv):
    """Installs a SIGALRM handler and a 5 ms interval timer in the worker (as env code that
    times its own calls does): the worker's idle wait must survive the signals."""

    def __init__(self, parent_pid: int = 0):
        super().__init__()
        self.armed = os.getpid() != parent_pid  # not in the test process (pytest-timeout)
        if self.armed:
            signal.signal(signal.SIGALRM, lambda *_: None)
            signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)

    def close(self):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)


class SlowStepEnv(CounterEnv):
    def __init__(self, seconds: float = 0.002):
        super().__init__()
        self.seconds = seconds

    def step(self, action):
        time.sleep(self.seconds)
        return super().step(action)


class SlowAtEnv(CounterEnv):
    """CounterEnv whose ``at``-th step takes ``seconds`` (a legitimately slow step) and
    every other step ``pace`` seconds."""

    def __init__(self, at: int = 2, seconds: float = 1.0, pace: float = 0.0):
        super().__init__()
        self.at, self.seconds, self.pace, self.t = at, seconds, pace, 0

    def step(self, action):
        self.t += 1
        time.sleep(self.seconds if self.t == self.at else self.pace)
        return super().step(action)


class HangingCallEnv(CounterEnv):
    """Methods that never return when called through ``call()``/``set_attr``/``render``:
    a busy loop (the worker's heartbeat thread keeps beating)."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, hang_render: bool = False, render_mode=None):
        super().__init__()
        self.hang_render, self.render_mode = hang_render, render_mode

    def spin(self):
        do_fault("busy")

    def __setattr__(self, name, value):
        if name == "stuck":
            do_fault("sleep")
        super().__setattr__(name, value)

    def render(self):
        if self.hang_render:
            do_fault("busy")
        return np.zeros((2, 2, 3), np.uint8)

    def ping(self):
        return os.getpid()


class CommandFault(gym.Wrapper):
    """Any env, faulting on command: when the test writes ``<command_dir>/env<index>.cmd``
    (a kind of FAULTS), the next step removes the file and does that fault in the worker.
    Without a command the wrapper changes nothing, so SyncVectorEnv can run the same env."""

    def __init__(self, env: gym.Env, command_dir: str | None = None, index: int = 0):
        super().__init__(env)
        self.command_dir, self.index = command_dir, index

    def step(self, action):
        fault_on_command(self.command_dir, self.index)
        return self.env.step(action)


class EntropyEnv(CounterEnv):
    """Reads os.urandom in step: a replay of its episode cannot match the log."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward + os.urandom(1)[0], terminated, truncated, info


class CrashesAtEnv(CounterEnv):
    """Segfaults at step ``at`` of any episode that began with ``reset(seed=seed)``: a
    deterministic crash, which a replay of that episode repeats."""

    def __init__(self, seed: int = 5, at: int = 7):
        super().__init__()
        self.crash_seed, self.at, self.seeded = seed, at, None

    def reset(self, *, seed=None, options=None):
        self.seeded = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self.seeded == self.crash_seed and self._state[1] + 1 == self.at:
            do_fault("segfault")
        return super().step(action)


class ScaledEnv(CounterEnv):
    """CounterEnv whose reward is multiplied by an attribute a test changes with set_attr
    or a method call: replaying an episode must replay those too."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0

    def set_scale(self, scale: float) -> float:
        self.scale = float(scale)
        return self.scale

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward * self.scale, terminated, truncated, info


class CallOnceEnv(ResetFaultEnv):
    """ResetFaultEnv whose ``die_once(marker)`` SIGKILLs the process of the one env that
    creates the marker file: a call that a replayed worker can answer."""

    def die_once(self, marker: str) -> int:
        try:  # O_EXCL: of several envs called at once, exactly one dies
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return int(self._state[1])
        do_fault("sigkill")


class SnapshotEnv(CounterEnv):
    """CounterEnv that offers get_state()/set_state(): everything its future depends on
    (its observation state and the episode length it drew)."""

    def get_state(self):
        return self._state.copy(), self._len

    def set_state(self, state):
        obs_state, length = state
        self._state, self._len = obs_state.copy(), length


class SnapshotCommandFault(CommandFault):
    """CommandFault over an env with get_state()/set_state(), passed through: only the
    outermost object's methods count, so a wrapper that keeps them must forward them."""

    def get_state(self):
        return self.env.get_state()

    def set_state(self, state):
        self.env.set_state(state)


class SlowReplayEnv(CounterEnv):
    """CounterEnv whose steps take ``seconds`` once ``marker`` exists: a replay in a new
    worker much slower than the steps it replays were."""

    def __init__(self, marker: str = "", seconds: float = 0.2):
        super().__init__()
        self.marker, self.seconds = marker, seconds

    def step(self, action):
        if self.marker and os.path.exists(self.marker):
            time.sleep(self.seconds)
        return super().step(action)


class BuildProbe:
    """env_fn that leaves a file per build, ``build_<pid>_<index>_<random>`` in ``log_dir``
    (index -1: one function for every env), and, in a spare process only (its name is
    "fastvec-spare"), does ``spare_fault`` while building: "raise", "sleep" (forever), or
    "slow-raise" (1 s, then raise): a spare that cannot build, hangs, or fails late."""

    def __init__(self, log_dir: str, index: int = -1, spare_fault: str | None = None):
        self.log_dir, self.index, self.spare_fault = log_dir, index, spare_fault

    def __call__(self):
        import multiprocessing
        if self.spare_fault and multiprocessing.current_process().name == "fastvec-spare":
            if self.spare_fault == "slow-raise":
                time.sleep(1.0)
            if self.spare_fault in ("raise", "slow-raise"):
                raise OSError(98, "Address already in use (injected: spares cannot build)")
            do_fault(self.spare_fault)
        name = f"build_{os.getpid()}_{self.index}_{os.urandom(4).hex()}"
        open(os.path.join(self.log_dir, name), "x").close()
        return CounterEnv(index=max(self.index, 0))


def builds(log_dir: str) -> list[tuple[int, int]]:
    """(pid, env index) of every BuildProbe build so far."""
    return [(int(name.split("_")[1]), int(name.split("_")[2])) for name in os.listdir(log_dir)
            if name.startswith("build_")]
