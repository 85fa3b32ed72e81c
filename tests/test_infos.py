"""Typed info columns (fastvec/infos.py): numeric infos in shared memory, never pickled
once known, and results exactly SyncVectorEnv's, mixed types and odd cases included."""

from __future__ import annotations

import functools
import os
import signal

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from fastvec import FastVectorEnv
from fastvec.shm import get_pickle
from fastvec.infos import ARRAY_BYTES, COLUMNS, check_spec, column_of, learnable
from test_equivalence import assert_same

pytestmark = pytest.mark.timeout(120)

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


class InfoEnv(gym.Env):
    """Numeric infos every step, as the wildfire env returns them (``burned_cells`` int,
    ``sim_minutes`` float); ``odd`` envs vary their value types and add keys sometimes."""

    def __init__(self, odd: bool = False, extra_keys: int = 0, length: int = 9):
        self.observation_space = spaces.Box(0, 100, (2,), np.float32)
        self.action_space = spaces.Discrete(3)
        self.odd, self.extra_keys, self.length = odd, extra_keys, length
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {"burned_cells": 0, "sim_minutes": 0.0}

    def _obs(self):
        return np.array([self.t, self.np_random.random()], np.float32)

    def step(self, action):
        self.t += 1
        t = self.t
        info = {"burned_cells": 3 * t + int(action), "sim_minutes": 30.0 * t,
                "f32": np.float32(t / 3), "i8": np.int8(-t), "u32": np.uint32(t),
                "on_fire": t % 2 == 0}
        for k in range(self.extra_keys):
            info[f"k{k}"] = t + k
        if self.odd:
            if t % 3 == 0:
                info["burned_cells"] = t / 2  # a float where the column holds ints
            if t % 4 == 0:
                info["label"] = f"t{t}"  # never a column
                info["vec"] = np.arange(2) * t
            if t % 5 == 0:
                del info["sim_minutes"]
        done = t >= self.length
        if done:
            info["burned_fraction"] = t / 100  # only at the end of an episode
        return self._obs(), float(t), done, False, info


def run_both(fns, mode, steps=40, **fast_kwargs):
    """SyncVectorEnv and FastVectorEnv through the same seeds and actions, compared exactly;
    returns the FastVectorEnv (open: the caller closes it)."""
    n = len(fns)
    sync = SyncVectorEnv(fns, autoreset_mode=mode)
    fast = FastVectorEnv(fns, autoreset_mode=mode, **fast_kwargs)
    rng = np.random.default_rng(3)
    try:
        assert_same(sync.reset(seed=5), fast.reset(seed=5), "reset")
        for t in range(steps):
            a = rng.integers(0, 3, n)
            expected, got = sync.step(a), fast.step(a)
            assert_same(expected, got, f"step {t}")
            for key, value in expected[4].items():  # dtypes too (data_equivalence checks them)
                if isinstance(value, np.ndarray):
                    assert got[4][key].dtype == value.dtype, key
            done = expected[2] | expected[3]
            if mode == AutoresetMode.DISABLED and done.any():
                assert_same(sync.reset(options={"reset_mask": done}),
                            fast.reset(options={"reset_mask": done}), f"partial reset {t}")
    except BaseException:
        fast.close()
        raise
    finally:
        sync.close()
    return fast


def payload_bytes(env) -> list[int]:
    """Per worker, the side-buffer bytes of its latest reply that carry infos or
    observation leaves: 0 when it carried nothing, or only how an episode began (resume's
    episode log, once per episode)."""
    out = []
    for slot in env._sup.slots:
        n = slot.ctl.resp_payload_len
        if n:
            infos, pobs, _ = get_pickle(slot.payload, n)
            if not any(infos) and all(p is None for p in pobs):
                n = 0
        out.append(n)
    return out


def assert_nothing_pickled(env, steps: int = 5) -> None:
    """A reset and ``steps`` steps whose replies carry no side-buffer bytes: every info
    value sits in a column."""
    env.reset(seed=1)
    assert payload_bytes(env) == [0] * len(env._sup.slots)
    for _ in range(steps):
        env.step(np.ones(env.num_envs, np.int64))
        assert payload_bytes(env) == [0] * len(env._sup.slots)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_numeric_infos_are_learned_and_then_never_pickled(mode, envs_per_worker):
    fast = run_both([InfoEnv] * 3, mode, envs_per_worker=envs_per_worker)
    try:
        # an episode's last info has burned_fraction; in SAME_STEP it sits in final_info,
        # a nested dict, which stays pickled (final_obs / final_info end episodes only)
        learned = {"burned_cells", "sim_minutes", "f32", "i8", "u32", "on_fire"}
        if mode != AutoresetMode.SAME_STEP:
            learned.add("burned_fraction")
        assert learned <= set(fast._infos.keys)
        assert_nothing_pickled(fast)
    finally:
        fast.close()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_mixed_types_missing_keys_and_other_values_match_sync(mode, envs_per_worker):
    fns = [InfoEnv, functools.partial(InfoEnv, odd=True), InfoEnv,
           functools.partial(InfoEnv, odd=True, length=6)]
    run_both(fns, mode, steps=60, envs_per_worker=envs_per_worker).close()


def test_declared_columns_pickle_nothing_from_the_first_step():
    spec = {"burned_cells": int, "sim_minutes": float, "f32": np.float32, "i8": np.int8,
            "u32": "uint32", "on_fire": bool}
    env = FastVectorEnv([InfoEnv] * 2, info_spec=spec)
    try:
        assert env._infos.keys == list(spec)
        env.reset(seed=0)
        assert payload_bytes(env) == [0, 0]  # reset infos are typed too
        _, _, _, _, info = env.step(np.ones(2, np.int64))
        assert payload_bytes(env) == [0, 0]
        assert info["burned_cells"].dtype == np.int64 and info["f32"].dtype == np.float32
        assert info["u32"].dtype == np.uint32 and info["on_fire"].dtype == np.bool_
        assert info["burned_cells"].tolist() == [4, 4] and info["_on_fire"].all()
    finally:
        env.close()


def test_keys_beyond_the_column_capacity_stay_pickled_and_correct():
    fast = run_both([functools.partial(InfoEnv, extra_keys=COLUMNS)] * 2,
                    AutoresetMode.NEXT_STEP, steps=12)
    try:
        assert len(fast._infos.keys) == COLUMNS
        fast.step(np.ones(2, np.int64))
        assert all(n > 0 for n in payload_bytes(fast))  # the rest still travels pickled
    finally:
        fast.close()


@pytest.mark.parametrize("context", ["serial", "spawn"])
def test_other_contexts(context):
    run_both([InfoEnv, functools.partial(InfoEnv, odd=True)], AutoresetMode.NEXT_STEP,
             steps=20, context=context).close()


def test_first_ready_batches_use_the_columns():
    env = FastVectorEnv([InfoEnv] * 4, batch_size=2)
    try:
        env.reset(seed=0)
        for _ in range(3):  # lockstep steps: the columns are learned
            env.step(np.ones(4, np.int64))
        env.send(np.ones(4, np.int64))
        seen = 0
        while seen < 4:
            obs, _, _, _, info, ids = env.recv()
            seen += len(ids)
            assert info["burned_cells"].tolist() == [3 * int(o[0]) + 1 for o in obs]
            assert info["sim_minutes"].tolist() == [30.0 * o[0] for o in obs]
        assert env._infos.n >= 6
    finally:
        env.close()


def test_a_respawned_worker_writes_the_published_columns():
    env = FastVectorEnv([InfoEnv] * 2, max_restarts=3, resume="off")
    try:
        env.reset(seed=0)
        for _ in range(3):
            env.step(np.ones(2, np.int64))
        os.kill(env.health()[1]["pid"], signal.SIGKILL)
        _, _, _, trunc, info = env.step(np.ones(2, np.int64))
        assert trunc[1] and info["worker_restarted"][1]
        for _ in range(3):  # env 1 first resets (NEXT_STEP), then steps
            obs, _, _, _, info = env.step(np.ones(2, np.int64))
            assert payload_bytes(env) == [0, 0]
            assert info["burned_cells"].tolist() == [3 * int(o[0]) + 1 if o[0] else 0
                                                     for o in obs]
    finally:
        env.close()


def test_learnable_values():
    for value in (1, 2.5, True, np.float32(1), np.int8(1), np.uint32(1), np.float16(1)):
        assert learnable(value), value
    for value in ("s", None, np.bool_(True), np.uint64(1), np.complex64(1), np.ones(2),
                  np.longdouble(1), {"a": 1}):
        assert not learnable(value), value


class ArrayInfoEnv(InfoEnv):
    """Fixed-shape array infos (a heat profile, a grid of counts, a bool mask); ``odd``
    envs sometimes change a dtype, return a big-endian array, and one too large for the
    arena. (Another shape under a key makes gymnasium's own batching raise.)"""

    def step(self, action):
        obs, reward, done, trunc, info = super().step(action)
        t = self.t
        info["heat"] = np.linspace(0, t, 3, dtype=np.float32)
        info["cells"] = np.arange(4, dtype=np.int64).reshape(2, 2) * t
        info["burning"] = np.array([t % 2 == 0, True])
        info["scalar0d"] = np.array(t * 1.5)
        if self.odd:
            if t % 3 == 0:
                info["heat"] = np.zeros(3, np.float64)  # another dtype
            if t % 4 == 0:
                info["cells"] = info["cells"].astype(np.int32)  # another dtype
            if t % 5 == 0:
                info["burning"] = info["burning"].astype(">i2")  # not native
            info["big"] = np.zeros(ARRAY_BYTES, np.uint8)  # never fits the arena
        return obs, reward, done, trunc, info


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("envs_per_worker", [1, 2])
def test_array_infos_get_columns_and_match_sync(mode, envs_per_worker):
    fast = run_both([ArrayInfoEnv] * 3, mode, envs_per_worker=envs_per_worker)
    try:
        assert {"heat", "cells", "burning", "scalar0d"} <= set(fast._infos.keys)
        assert_nothing_pickled(fast)
    finally:
        fast.close()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_array_infos_of_other_shapes_and_dtypes_match_sync(mode):
    fns = [ArrayInfoEnv, functools.partial(ArrayInfoEnv, odd=True), ArrayInfoEnv,
           functools.partial(ArrayInfoEnv, odd=True, length=6)]
    fast = run_both(fns, mode, steps=60, envs_per_worker=2)
    try:
        assert "big" not in fast._infos.keys
    finally:
        fast.close()


def test_declared_array_columns_pickle_nothing_from_the_first_step():
    spec = {"burned_cells": int, "sim_minutes": float, "f32": np.float32, "i8": np.int8,
            "u32": "uint32", "on_fire": bool, "heat": (np.float32, (3,)),
            "cells": ("int64", (2, 2)), "burning": (bool, (2,)), "scalar0d": (np.float64, ())}
    env = FastVectorEnv([ArrayInfoEnv] * 2, info_spec=spec)
    try:
        env.reset(seed=0)
        _, _, _, _, info = env.step(np.ones(2, np.int64))
        assert payload_bytes(env) == [0, 0]
        assert info["heat"].dtype == np.float32 and info["heat"].shape == (2, 3)
        assert info["cells"].tolist() == [[[0, 1], [2, 3]]] * 2 and info["_cells"].all()
        assert info["scalar0d"].shape == (2,) and info["scalar0d"].tolist() == [1.5, 1.5]
    finally:
        env.close()


def test_array_columns_fill_the_arena_and_no_further():
    assert column_of(np.zeros(3, np.float32)) == (np.float32, (3,))
    assert column_of(np.zeros(ARRAY_BYTES + 1, np.uint8)) is None
    assert column_of(np.zeros(2, np.complex64)) is None and column_of(np.zeros(2, ">f4")) is None
    half = {"a": (np.uint8, (ARRAY_BYTES // 2,)), "b": (np.uint8, (ARRAY_BYTES // 2,))}
    assert set(check_spec(half)) == {"a", "b"}
    with pytest.raises(ValueError, match="arena holds"):
        check_spec({**half, "c": (np.uint8, (8,))})
    with pytest.raises(ValueError, match="array column"):
        check_spec({"a": (object, (2,))})


@pytest.mark.parametrize("spec,match", [
    ({"a": str}, "info_spec"),
    ({"a": np.uint64}, "uint64"),
    ({"a": np.complex64}, "info_spec"),
    ({"final_obs": float}, "final_obs"),
    ({1: int}, "str keys"),
    ([("a", int)], "dict"),
    ({f"k{i}": int for i in range(COLUMNS + 1)}, "at most"),
])
def test_bad_info_spec_is_refused_at_construction(spec, match):
    with pytest.raises(ValueError, match=match):
        check_spec(spec)
    with pytest.raises(ValueError, match=match):
        FastVectorEnv([InfoEnv], info_spec=spec)
