"""Small deterministic envs for the tests, at module level so they pickle under spawn.

Every env draws from ``self.np_random`` only, so two copies reset with the same seed
produce the same trajectory given the same actions (the basis of the equivalence tests).
"""

from __future__ import annotations

import copy
import os
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def nested_obs_space(scalars: bool = True) -> spaces.Dict:
    space = spaces.Dict({
        "pos": spaces.Box(-1.0, 1.0, (3,), np.float32),
        "grid": spaces.Box(0, 255, (2, 3), np.uint8),
        "parts": spaces.Tuple((
            spaces.Discrete(5),
            spaces.MultiDiscrete([3, 4]),
            spaces.Dict({"bits": spaces.MultiBinary(4),
                         "vel": spaces.Box(-10.0, 10.0, (2, 2), np.float64)}),
        )),
        "mode": spaces.Discrete(3, start=-1),
    })
    if not scalars:  # the same without 0-d leaves
        space = spaces.Dict({
            "pos": space["pos"], "grid": space["grid"],
            "parts": spaces.Tuple((spaces.MultiDiscrete([5]), *space["parts"].spaces[1:])),
            "mode": spaces.MultiDiscrete([3], start=[-1]),
        })
    return space


def nested_act_space() -> spaces.Dict:
    return spaces.Dict({
        "move": spaces.Box(-1.0, 1.0, (2,), np.float32),
        "pick": spaces.Tuple((spaces.Discrete(3, start=-1), spaces.MultiBinary(2))),
        "md": spaces.MultiDiscrete([2, 5]),
        "sub": spaces.Dict({"gear": spaces.Discrete(4),
                            "flags": spaces.MultiBinary((2, 2))}),
    })


class NestedEnv(gym.Env):
    """Nested Dict/Tuple observation and action spaces with every fixed-size leaf type."""

    metadata = {"render_modes": []}

    def __init__(self, max_len: int = 12, scalars: bool = True):
        self.observation_space = nested_obs_space(scalars)
        self.scalars = scalars
        self.action_space = nested_act_space()
        self.max_len = max_len
        self.t = 0
        self.limit = max_len
        self.acc = np.zeros(2)

    def _obs(self):
        rng = self.np_random
        obs = {
            "pos": rng.uniform(-1, 1, 3).astype(np.float32),
            "grid": rng.integers(0, 256, (2, 3), dtype=np.uint8),
            "parts": (
                int(rng.integers(5)),
                rng.integers([3, 4]).astype(np.int64),
                {"bits": rng.integers(0, 2, 4).astype(np.int8),
                 "vel": np.clip(np.outer(self.acc, [1.0, -1.0]), -10, 10)},
            ),
            "mode": int(rng.integers(-1, 2)),
        }
        if not self.scalars:
            obs["parts"] = (np.array([obs["parts"][0]]), *obs["parts"][1:])
            obs["mode"] = np.array([obs["mode"]])
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.limit = int(self.np_random.integers(3, self.max_len))
        self.acc = np.zeros(2)
        return self._obs(), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self.t += 1
        move = np.asarray(action["move"], np.float64)
        gear, pick = int(action["sub"]["gear"]), int(action["pick"][0])
        self.acc = self.acc + move
        reward = float(move.sum() + gear - pick + np.sum(action["md"])
                       + np.sum(action["sub"]["flags"]) * 0.5 + np.sum(action["pick"][1]) * 0.25)
        terminated = bool(np.abs(self.acc).max() > 2.5)
        truncated = self.t >= self.limit
        return self._obs(), reward, terminated, truncated, {}


class RasterInfoEnv(gym.Env):
    """A 3x32x32 uint8 raster observation plus infos of many types, on some steps only.

    The observation is written from non-contiguous sources (a transpose, negative
    strides) to exercise the strided copy into the ring slot.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, max_len: int = 20, render_mode=None):
        self.observation_space = spaces.Box(0, 255, (3, 32, 32), np.uint8)
        self.action_space = spaces.Discrete(4)
        self.max_len = max_len
        self.render_mode = render_mode
        self.t = 0
        self.limit = max_len
        self.episode = 0
        self.ret = 0.0
        self.img = np.zeros((32, 32, 3), np.uint8)

    def _obs(self):
        self.img = self.np_random.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        obs = self.img.transpose(2, 0, 1)  # not contiguous
        if self.t % 2:
            obs = obs[:, ::-1, ::-1]  # negative strides
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self.ret = 0.0
        self.limit = int(self.np_random.integers(4, self.max_len))
        self.episode += 1
        info = {"episode_id": self.episode} if self.episode % 2 == 0 else {}
        return self._obs(), info

    def step(self, action):
        self.t += 1
        t = self.t
        reward = float(action) - 1.5 + float(self.np_random.normal())
        self.ret += reward
        terminated = bool(action == 3 and self.np_random.random() < 0.15)
        truncated = t >= self.limit
        info: dict = {}
        if t % 3 == 0:
            info["count"] = t
        if t % 4 == 1:
            info["ratio"] = t / 7.0
        if t % 5 == 2:
            info["vec"] = np.arange(3, dtype=np.float32) * t
            info["nested"] = {"a": t * 2, "b": np.full((2, 2), t, np.int16),
                              "c": {"deep": bool(t % 2)}}
        if t % 7 == 3:
            info["label"] = f"s{t}"
        if terminated or truncated:
            info["episode"] = {"r": self.ret, "l": t}
        return self._obs(), reward, terminated, truncated, info

    def render(self):
        return self.img.copy()


class AttrEnv(gym.Env):
    """Exposes attributes and methods for call / get_attr / set_attr, and knobs for faults.

    ``sleep``: seconds every step sleeps; ``info_bytes``: size of an array put into the
    info of every step; ``bad_obs_at``: the step count at which the observation does not
    fit the space (``bad_kind`` "shape" or "dtype").
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, index: int = 0, sleep: float = 0.0, info_bytes: int = 0,
                 bad_obs_at: int | None = None, bad_kind: str = "shape", render_mode=None,
                 reset_info_bytes: int = 0):
        self.observation_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)
        self.action_space = spaces.Discrete(3)
        self.index = index
        self.sleep = sleep
        self.info_bytes = info_bytes
        self.reset_info_bytes = reset_info_bytes
        self.bad_obs_at = bad_obs_at
        self.bad_kind = bad_kind
        self.render_mode = render_mode
        self.value = 0
        self.t = 0

    def _obs(self):
        if self.bad_obs_at is not None and self.t == self.bad_obs_at:
            if self.bad_kind == "shape":
                return np.zeros(3, np.float32)
            return np.array(["x", "y"])  # a dtype that cannot become float32
        return np.array([self.index, self.t], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        info = {}
        if self.reset_info_bytes:
            info["blob"] = _blob(self.reset_info_bytes, self.index)
        return self._obs(), info

    def step(self, action):
        if self.sleep:
            time.sleep(self.sleep)
        self.t += 1
        info = {}
        if self.info_bytes:
            info["blob"] = _blob(self.info_bytes, self.index + self.t)
        return self._obs(), float(action) + self.t, False, False, info

    # for call / get_attr / set_attr
    def add(self, x, y=0):
        return x + y + self.index

    def echo(self, payload):
        return payload

    def pid(self):
        return os.getpid()

    def boom(self):
        raise KeyError(f"boom from env {self.index}")

    def render(self):
        return np.full((4, 5, 3), self.index, np.uint8)


def _blob(nbytes: int, fill: int) -> np.ndarray:
    out = np.arange(nbytes // 8, dtype=np.float64)
    out[0] = fill
    return out


def blob_expected(nbytes: int, fill: int) -> np.ndarray:
    return _blob(nbytes, fill)


class RaisingFactory:
    """An env_fn that raises when called in a process other than the one that made it."""

    def __init__(self, message: str = "cannot build this env here"):
        self.parent = os.getpid()
        self.message = message

    def __call__(self):
        if os.getpid() != self.parent:
            raise RuntimeError(self.message)
        return AttrEnv()


class TwoArgError(Exception):
    """An exception that pickles but does not unpickle (its __init__ takes two arguments)."""

    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


class TwoArgFactory:
    """An env_fn that raises TwoArgError in a worker process."""

    def __init__(self):
        self.parent = os.getpid()

    def __call__(self):
        if os.getpid() != self.parent:
            raise TwoArgError("unpicklable failure", "env construction")
        return AttrEnv()


class StepRaisesEnv(AttrEnv):
    """Raises an exception in step ``raise_at`` (``kind`` "plain" or "twoarg")."""

    def __init__(self, raise_at: int = 2, kind: str = "plain", **kw):
        super().__init__(**kw)
        self.raise_at = raise_at
        self.kind = kind

    def step(self, action):
        if self.t + 1 == self.raise_at:
            self.t += 1
            if self.kind == "twoarg":
                raise TwoArgError("step failed", f"t={self.t}")
            raise RuntimeError(f"step failed at t={self.t}")
        return super().step(action)


class SpaceEnv(gym.Env):
    """An env with arbitrary observation and action spaces (samples seeded by reset, and
    the action echoed in the info, so runs compare step for step)."""

    def __init__(self, obs_space, act_space=None):
        # Copies: in-process (SyncVectorEnv) envs must not share one space's RNG.
        self.observation_space = copy.deepcopy(obs_space)
        self.action_space = copy.deepcopy(act_space) if act_space is not None else spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.observation_space.seed(seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {"action": repr(action)}


class LongLongEnv(gym.Env):
    """A Box(int64) observation produced as ``np.longlong``: numpy calls the two dtypes
    equal (on LP64 Linux int64 is ``long``), only their buffer format letters differ."""

    def __init__(self):
        self.observation_space = spaces.Box(0, 100, (3,), np.int64)
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.arange(3, dtype=np.longlong), {}

    def step(self, action):
        self.t += 1
        return np.arange(3, dtype=np.longlong) + self.t, 0.0, False, False, {}
