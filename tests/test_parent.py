"""The parent's compiled step path (fastvec/_parent.pyx, csrc/actions.c): the bounds check
agrees with gymnasium's ``contains`` on every kind of action leaf, a batch it does not take
leaves shared memory untouched, and the spin policy follows the cores in reach."""

from __future__ import annotations

import os
from contextlib import closing

import numpy as np
import pytest
from gymnasium import spaces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import envs as test_envs
from fastvec import FastVectorEnv, _parent, _ring
from fastvec.errors import InvalidActionError
from fastvec.layout import leaves

pytestmark = pytest.mark.timeout(120)

SPACES = {
    "box-f32": spaces.Box(np.array([-1.0, 0.0, -np.inf], np.float32),
                          np.array([1.0, np.inf, 0.0], np.float32), dtype=np.float32),
    "box-f64-2d": spaces.Box(-2.0, 3.0, (2, 2), np.float64),
    "box-i16": spaces.Box(-5, 7, (3,), np.int16),
    "box-u8": spaces.Box(0, 200, (2,), np.uint8),
    "discrete": spaces.Discrete(5, start=-2),
    "multidiscrete": spaces.MultiDiscrete([3, 4, 2], start=[1, -1, 0]),
    "multibinary": spaces.MultiBinary(3),
}
N = 4


def writer_for(space, check=True):
    (leaf,) = leaves(space)
    view = np.full((N, *leaf.shape), 99, leaf.dtype)
    history = np.zeros((4, N, *leaf.shape), leaf.dtype)
    return _parent.ActionWriter(leaf, view, history, check), view, history


def candidates(space, rng):
    """Batches of actions around the bounds: inside, on them, just outside, NaN."""
    (leaf,) = leaves(space)
    shape = (N, *leaf.shape)
    if isinstance(space, spaces.Box):
        lo = np.where(np.isfinite(space.low), space.low, -1e6).astype(np.float64)
        hi = np.where(np.isfinite(space.high), space.high, 1e6).astype(np.float64)
        pool = np.stack([lo, hi, lo - 1, hi + 1, (lo + hi) / 2])
    elif isinstance(space, spaces.Discrete):
        pool = np.array([space.start - 1, space.start, space.start + space.n - 1,
                         space.start + space.n])
    elif isinstance(space, spaces.MultiDiscrete):
        pool = np.stack([space.start - 1, space.start, space.start + space.nvec - 1,
                         space.start + space.nvec])
    else:
        pool = np.array([-1, 0, 1, 2])
    for _ in range(40):
        picks = rng.integers(0, len(pool), size=shape)
        if pool.ndim == 1:
            arr = pool[picks]
        else:
            flat = pool.reshape(len(pool), -1)
            cols = np.arange(flat.shape[1])
            arr = flat[picks.reshape(N, -1), cols].reshape(shape)
        if np.dtype(leaf.dtype).kind in "iu":
            info = np.iinfo(leaf.dtype)
            arr = np.clip(arr, info.min, info.max)
        yield np.ascontiguousarray(arr.astype(leaf.dtype))
    space.seed(0)
    for _ in range(5):  # inside, including the bounds themselves
        yield np.stack([np.asarray(space.sample(), leaf.dtype) for _ in range(N)])
    for edge in pool[:3] if pool.ndim > 1 else []:
        yield np.ascontiguousarray(np.broadcast_to(edge, shape).astype(leaf.dtype))
    if np.dtype(leaf.dtype).kind == "f":
        arr = np.zeros(shape, leaf.dtype)
        arr.reshape(-1)[0] = np.nan
        yield arr


@pytest.mark.parametrize("name", sorted(SPACES))
def test_the_kernel_agrees_with_gymnasium_contains(name):
    space = SPACES[name]
    writer, view, history = writer_for(space)
    rng = np.random.default_rng(0)
    verdicts = set()
    for h, arr in enumerate(candidates(space, rng)):
        want = all(space.contains(a) for a in arr)
        before = view.copy()
        got = writer.write(arr, h)
        assert got == want, (arr, got, want)
        verdicts.add(got)
        if got:
            np.testing.assert_array_equal(view, arr)
            np.testing.assert_array_equal(history[h % 4], arr)
        else:
            np.testing.assert_array_equal(view, before)  # nothing stored
    assert verdicts == {True, False}  # both sides of the bounds were tried


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(-10, 10), min_size=N * 3, max_size=N * 3))
def test_multidiscrete_kernel_matches_contains_on_random_batches(values):
    space = SPACES["multidiscrete"]
    writer, view, _ = writer_for(space)
    arr = np.array(values, np.int64).reshape(N, 3)
    assert writer.write(arr, 0) == all(space.contains(a) for a in arr)


def test_batches_the_kernel_does_not_take_leave_shared_memory_alone():
    space = spaces.Box(-1, 1, (3,), np.float32)
    writer, view, history = writer_for(space)
    ok = np.zeros((N, 3), np.float32)
    for arr in (ok.tolist(),                      # not an array: the Python path
                ok.astype(np.float64),            # another dtype: travels as the caller's
                np.zeros((N, 6), np.float32)[:, ::2],  # strided
                np.zeros((N + 1, 3), np.float32)):  # wrong batch
        assert writer.write(arr, 0) is False
        assert (view == 99).all() and (history == 0).all()
    unchecked, view, _ = writer_for(space, check=False)
    assert unchecked.write(np.full((N, 3), 5, np.float32), 1) and (view == 5).all()


def test_bounds_are_none_where_no_kernel_exists():
    assert _parent.bounds(spaces.Box(-1, 1, (2,), np.float16), np.float16) is None
    assert _parent.bounds(spaces.Discrete(3), np.int64)[1].tolist() == [2]
    lo, hi = _parent.bounds(SPACES["multidiscrete"], np.int64)
    assert lo.tolist() == [1, -1, 0] and hi.tolist() == [3, 2, 1]
    with pytest.raises(ValueError, match="no action kernel"):
        writer_for(spaces.Box(-1, 1, (2,), np.float16))


def test_out_of_bounds_actions_on_the_compiled_path_raise_the_usual_error():
    fn = test_envs.AttrEnv
    with closing(FastVectorEnv([fn] * 2)) as env:
        assert env._act_writer is not None
        env.reset(seed=0)
        with pytest.raises(InvalidActionError, match="action of env 1 is outside"):
            env.step(np.array([0, 7], np.int64))
        env.step(np.array([0, 1], np.int64))  # the env goes on


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to unpin")
def test_pinning_after_construction_switches_spinning_off_on_both_sides():
    """The benchmark's same-core placement: spinning there only takes the core from the
    process that would answer. The parent looks at the cores in reach every 256 steps and
    tells the workers with REQ_NO_SPIN."""
    cpus = os.sched_getaffinity(0)
    a = np.zeros(1, np.int64)
    with closing(FastVectorEnv([test_envs.AttrEnv])) as env:
        env.reset(seed=0)
        slot = env._sup.slots[0]
        assert env._sup.dispatch.spin_ns > 0
        one = {min(cpus)}
        try:
            os.sched_setaffinity(0, one)
            os.sched_setaffinity(slot.process.pid, one)
            for _ in range(300):
                env.step(a)
            assert env._sup.dispatch.spin_ns == 0 and slot.ctl.flags & _ring.REQ_NO_SPIN
        finally:
            os.sched_setaffinity(0, cpus)
        os.sched_setaffinity(slot.process.pid, cpus)
        for _ in range(300):
            env.step(a)
        assert env._sup.dispatch.spin_ns > 0 and not slot.ctl.flags & _ring.REQ_NO_SPIN
