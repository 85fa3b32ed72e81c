"""FastVectorEnv against gymnasium's SyncVectorEnv, step for step.

Both vector envs get the same env_fns, the same seeds and the same actions (drawn from a
seeded batched action space); every reset and step must return equivalent
(obs, rewards, terminations, truncations, infos), across autoreset modes, start methods
and envs_per_worker (5 envs, so chunks of 2 and 3 are uneven).
"""

from __future__ import annotations

import copy
import functools
from contextlib import closing

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import batch_space

import envs as test_envs
from fastvec import FastVectorEnv

pytestmark = pytest.mark.timeout(120)

NUM_ENVS = 5

ENV_FNS = {
    "cartpole": functools.partial(gym.make, "CartPole-v1"),
    "pendulum": functools.partial(gym.make, "Pendulum-v1", max_episode_steps=40),
    "nested": functools.partial(test_envs.NestedEnv, max_len=12),
    # the same without 0-d (Discrete) observation leaves
    "nested_nd": functools.partial(test_envs.NestedEnv, max_len=12, scalars=False),
    "raster": functools.partial(test_envs.RasterInfoEnv, max_len=20),
}
MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


def _describe(a, b, depth=0):
    """A short description of where two structures differ (for assertion messages)."""
    if type(a) is not type(b):
        return f"types {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            if not data_equivalence(a[k], b[k], exact=True):
                return f"[{k!r}] " + _describe(a[k], b[k], depth + 1)
    if isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b)):
            if not data_equivalence(x, y, exact=True):
                return f"[{i}] " + _describe(x, y, depth + 1)
    if isinstance(a, np.ndarray):
        return f"arrays {a!r} != {b!r}"
    return f"{a!r} != {b!r}"


def assert_same(expected, got, what):
    assert data_equivalence(expected, got, exact=True), f"{what}: {_describe(expected, got)}"


def run_against_sync(env_fn, mode, *, context="fork", envs_per_worker=1, steps=300,
                     copy_obs=True, num_envs=NUM_ENVS, action_seed=7):
    """Drive both vector envs through the same seeds and actions; returns episodes seen."""
    fns = [env_fn] * num_envs
    sync = SyncVectorEnv(fns, autoreset_mode=mode, copy=copy_obs)
    fast = FastVectorEnv(fns, context=context, envs_per_worker=envs_per_worker,
                         autoreset_mode=mode, copy=copy_obs)
    episodes = 0
    try:
        assert fast.single_observation_space == sync.single_observation_space
        assert fast.single_action_space == sync.single_action_space
        actions = batch_space(sync.single_action_space, num_envs)
        actions.seed(action_seed)

        def check_reset(**kwargs):
            expected = sync.reset(**copy.deepcopy(kwargs))
            got = fast.reset(**copy.deepcopy(kwargs))
            assert_same(expected, got, f"reset({kwargs})")

        check_reset(seed=123)
        for t in range(steps):
            if t == steps // 2:
                # A list of seeds, some None: those envs keep their generator.
                seeds = [1000 + i if i % 2 == 0 else None for i in range(num_envs)]
                check_reset(seed=seeds)
            a = actions.sample()
            expected = sync.step(a)
            got = fast.step(a)
            assert_same(expected, got, f"step {t}")
            done = expected[2] | expected[3]
            episodes += int(done.sum())
            if mode == AutoresetMode.DISABLED and done.any():
                # Exactly as a user would: reset only the finished envs, in both.
                check_reset(options={"reset_mask": done.copy()})
    finally:
        fast.close()
        sync.close()
    return episodes


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("envs_per_worker", [1, 2, 3])
@pytest.mark.parametrize("env_name", list(ENV_FNS))
def test_fork(env_name, envs_per_worker, mode):
    steps = 300 if env_name != "pendulum" else 200
    episodes = run_against_sync(ENV_FNS[env_name], mode, envs_per_worker=envs_per_worker,
                                steps=steps)
    assert episodes >= 2 * NUM_ENVS, "the run should cross several episode boundaries"


@pytest.mark.parametrize("context,env_name,envs_per_worker,mode", [
    ("spawn", "nested_nd", 3, AutoresetMode.NEXT_STEP),
    ("spawn", "raster", 2, AutoresetMode.SAME_STEP),
    ("forkserver", "raster", 3, AutoresetMode.DISABLED),
    ("forkserver", "cartpole", 2, AutoresetMode.NEXT_STEP),
])
def test_other_start_methods(context, env_name, envs_per_worker, mode):
    episodes = run_against_sync(ENV_FNS[env_name], mode, context=context,
                                envs_per_worker=envs_per_worker, steps=150)
    assert episodes >= NUM_ENVS


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("env_name", ["nested", "nested_nd", "raster"])
def test_copy_false(env_name, mode):
    episodes = run_against_sync(ENV_FNS[env_name], mode, envs_per_worker=2, steps=200,
                                copy_obs=False)
    assert episodes >= NUM_ENVS


def test_copy_false_view_survives_one_more_step():
    """With copy=False an observation is a view of its ring slot, valid until
    ``ring_depth`` (2) further steps: one more step must not change it."""
    fn = ENV_FNS["raster"]
    with closing(FastVectorEnv([fn] * 3, context="fork", copy=False)) as fast:
        obs, _ = fast.reset(seed=5)
        actions = batch_space(fast.single_action_space, 3)
        actions.seed(0)
        for _ in range(10):
            obs, *_ = fast.step(actions.sample())
            assert not obs.flags.owndata, "copy=False should return a view of the ring slot"
        prev = obs
        prev_copy = prev.copy()
        fast.step(actions.sample())
        np.testing.assert_array_equal(prev, prev_copy)
        del prev, obs


def test_copy_true_returns_independent_arrays():
    fn = ENV_FNS["nested_nd"]
    with closing(FastVectorEnv([fn] * 2, context="fork", copy=True)) as fast:
        obs, _ = fast.reset(seed=1)
        snapshot = copy.deepcopy(obs)
        actions = batch_space(fast.single_action_space, 2)
        actions.seed(1)
        for _ in range(4):
            fast.step(actions.sample())
        assert_same(snapshot, obs, "copy=True observation after later steps")


def test_seedless_reset_is_reproducible_from_earlier_seed():
    """reset(seed=int) then reset() (no seed) continues the seeded generators in both."""
    fn = ENV_FNS["raster"]
    sync = SyncVectorEnv([fn] * 3)
    fast = FastVectorEnv([fn] * 3, context="fork", envs_per_worker=2)
    try:
        assert_same(sync.reset(seed=[4, 5, 6]), fast.reset(seed=[4, 5, 6]), "seeded reset")
        assert_same(sync.reset(), fast.reset(), "seedless reset")
        a = np.array([3, 0, 2])
        assert_same(sync.step(a), fast.step(a), "step after seedless reset")
    finally:
        fast.close()
        sync.close()
