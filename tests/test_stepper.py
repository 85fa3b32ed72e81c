"""The worker's compiled step loop (fastvec/_stepper.pyx): which requests it serves, and
that what envs return in odd forms ends up exactly as SyncVectorEnv batches it."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from fastvec import FastVectorEnv
from fastvec.errors import SpaceMismatchError
from envs import SpaceEnv
from test_equivalence import MODES, run_against_sync

pytestmark = pytest.mark.timeout(120)


class OddReturnsEnv(gym.Env):
    """Observations and rewards in every form an env may hand back: another dtype than
    the space's, Fortran order, a Python list, numpy scalar rewards, flags as np.bool_
    or ints."""

    def __init__(self, form: str):
        self.observation_space = spaces.Box(-10, 10, (4, 3), np.float32)
        self.action_space = spaces.Box(-1, 1, (2,), np.float32)
        self.form = form
        self.t = 0

    def _obs(self):
        base = np.arange(12, dtype=np.float64).reshape(4, 3) / 7 + self.t
        if self.form == "float64":
            return base
        if self.form == "fortran":
            return np.asfortranarray(base.astype(np.float32))
        if self.form == "list":
            return base.astype(np.float32).tolist()
        return base.astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = int(self.np_random.integers(0, 3))
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        reward = np.float32(action.sum()) if self.form == "float64" else int(self.t)
        terminated = np.bool_(self.t % 5 == 0)
        truncated = int(self.t % 7 == 0)
        return self._obs(), reward, terminated, truncated, {}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("form", ["plain", "float64", "fortran", "list"])
def test_odd_returns_match_sync(form, mode):
    assert run_against_sync(functools.partial(OddReturnsEnv, form), mode, steps=40,
                            envs_per_worker=2) > 0


def test_the_kernel_serves_fixed_spaces_and_the_python_path_the_rest():
    fixed = FastVectorEnv([functools.partial(OddReturnsEnv, "plain")] * 2, context="serial")
    text = FastVectorEnv([functools.partial(SpaceEnv, spaces.Text(5))], context="serial")
    try:
        assert fixed._sup.slots[0].process.worker.kernel is not None
        assert text._sup.slots[0].process.worker.kernel is None
    finally:
        fixed.close()
        text.close()


class WrongShapeEnv(OddReturnsEnv):
    def step(self, action):
        out = super().step(action)
        return (np.zeros((3, 4), np.float32),) + out[1:]


def test_an_observation_that_does_not_fit_is_the_callers_error_not_a_crash():
    env = FastVectorEnv([functools.partial(WrongShapeEnv, "plain")] * 2)
    try:
        env.reset(seed=0)
        with pytest.raises(SpaceMismatchError, match=r"env 0 .*shape \(3, 4\)"):
            env.step(np.zeros((2, 2), np.float32))
        assert all(h["restarts"] == 0 for h in env.health())
    finally:
        env.close()
