"""From gymnasium spaces to a fixed byte layout in shared memory.

A space is flattened into *leaves* (Box, Discrete, MultiDiscrete, MultiBinary), walking
Dict and Tuple in order. A leaf without a fixed size (Text, Sequence, Graph, OneOf, any
custom Space) is a *pickled* leaf: its values travel pickled through the worker's side
buffer, per step, and are batched as gymnasium batches them (``concatenate``). Each fixed
leaf gets batched regions in the main segment:

    obs    [depth][num_envs][*leaf.shape]   a ring of `depth` result slots
    action [num_envs][*leaf.shape]

plus, per ring slot, reward (float64), terminated and truncated (bool), and the typed
info columns (fastvec/infos.py). The control blocks of the workers and the batch block
(csrc/ring.h) come first; the stats header (fastvec/stats.py) comes last, where a reader
outside the job finds it. Rows of one env are contiguous, so any subset of envs can be
gathered into a batch (see _raster.gather_rows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import iterate

from fastvec import _raster, _ring, infos, stats

from fastvec.errors import (ActionBatchTypeError, InvalidActionError, SpaceMismatchError,
                            UnsupportedSpaceError)

_ALIGN = 64


@dataclass(frozen=True)
class Leaf:
    """One array of a (possibly nested) space; ``pickled`` leaves have no fixed size."""

    path: tuple
    space: spaces.Space
    shape: tuple | None
    dtype: np.dtype | None
    pickled: bool = False


@functools.singledispatch
def leaves(space: spaces.Space, path: tuple = ()) -> list[Leaf]:
    """The leaves of ``space``, depth first, in the space's own order."""
    if not isinstance(space, spaces.Space):
        raise UnsupportedSpaceError(f"{space!r} is not a gymnasium Space")
    return [Leaf(path, space, None, None, pickled=True)]


@leaves.register(spaces.Box)
@leaves.register(spaces.MultiDiscrete)
@leaves.register(spaces.MultiBinary)
@leaves.register(spaces.Discrete)
def _(space, path=()):
    return [Leaf(path, space, tuple(space.shape), np.dtype(space.dtype))]


@leaves.register(spaces.Dict)
def _(space, path=()):
    return [leaf for key, sub in space.spaces.items() for leaf in leaves(sub, path + (key,))]


@leaves.register(spaces.Tuple)
def _(space, path=()):
    return [leaf for i, sub in enumerate(space.spaces) for leaf in leaves(sub, path + (i,))]


def flatten(space: spaces.Space, value: Any) -> list:
    """The leaf values of ``value`` in the order of ``leaves(space)``."""
    if isinstance(space, spaces.Dict):
        if not isinstance(value, dict):
            raise SpaceMismatchError(f"expected a dict for {space}, got {type(value).__name__}")
        missing = set(space.spaces) - set(value)
        if missing:
            raise SpaceMismatchError(f"dict is missing keys {sorted(missing)} of {space}")
        return [v for key, sub in space.spaces.items() for v in flatten(sub, value[key])]
    if isinstance(space, spaces.Tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(space.spaces):
            got = (f"{type(value).__name__} of length {len(value)}"
                   if isinstance(value, (tuple, list)) else type(value).__name__)
            raise SpaceMismatchError(f"expected a tuple of {len(space.spaces)} for {space}, "
                                     f"got a {got}")
        return [v for sub, item in zip(space.spaces, value) for v in flatten(sub, item)]
    return [value]


def unflatten(space: spaces.Space, values: list) -> Any:
    """Inverse of :func:`flatten`: rebuild the nested dict/tuple around leaf values."""
    if not isinstance(space, (spaces.Dict, spaces.Tuple)):
        return values[0]
    return _build(space, iter(values))


def _build(space: spaces.Space, it) -> Any:
    # Module level on purpose: a nested recursive closure is a reference cycle that would
    # keep every returned batch alive until the cycle collector runs.
    if isinstance(space, spaces.Dict):
        return {key: _build(sub, it) for key, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(_build(sub, it) for sub in space.spaces)
    return next(it)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class Region:
    offset: int
    shape: tuple
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def view(self, buf) -> np.ndarray:
        count = int(np.prod(self.shape, dtype=np.int64))
        return np.frombuffer(buf, self.dtype, count, self.offset).reshape(self.shape)


class Plan:
    """Where every array of a FastVectorEnv lives in the main segment (picklable)."""

    def __init__(self, obs_space: spaces.Space, act_space: spaces.Space, num_envs: int,
                 num_workers: int, depth: int):
        self.obs_leaves = leaves(obs_space)
        self.act_leaves = leaves(act_space)
        self.num_envs, self.num_workers, self.depth = num_envs, num_workers, depth
        self.batch_offset = _aligned(num_workers * _ring.CTL_SIZE)
        offset = _aligned(self.batch_offset + _ring.BATCH_SIZE)

        def region(shape, dtype):
            nonlocal offset
            r = Region(offset, tuple(shape), np.dtype(dtype))
            offset = _aligned(offset + r.nbytes)
            return r

        self.obs = [None if lf.pickled else region((depth, num_envs, *lf.shape), lf.dtype)
                    for lf in self.obs_leaves]
        self.act = [None if lf.pickled else region((num_envs, *lf.shape), lf.dtype)
                    for lf in self.act_leaves]
        self.pickled_obs = [k for k, lf in enumerate(self.obs_leaves) if lf.pickled]
        self.pickled_act = [k for k, lf in enumerate(self.act_leaves) if lf.pickled]
        self.reward = region((depth, num_envs), np.float64)
        self.terminated = region((depth, num_envs), np.bool_)
        self.truncated = region((depth, num_envs), np.bool_)
        # typed info columns (fastvec/infos.py): the schema, then values and presence
        self.info_version = region((1,), np.uint64)
        self.info_blob = region((infos.BLOB_BYTES,), np.uint8)
        self.info_values = region((depth, num_envs, infos.COLUMNS), np.int64)
        self.info_present = region((depth, num_envs, infos.COLUMNS), np.uint8)
        self.info_arrays = region((depth, num_envs, infos.ARRAY_BYTES), np.uint8)
        # the segment's last bytes: found there by readers that do not know the spaces
        self.stats_offset = offset
        self.size = offset + stats.HEADER_SIZE

    def views(self, buf) -> "Views":
        return Views(self, buf)


class Views:
    """numpy arrays over a mapped main segment, laid out by a :class:`Plan`."""

    def __init__(self, plan: Plan, buf):
        self.obs = [None if r is None else r.view(buf) for r in plan.obs]  # None: pickled
        self.act = [None if r is None else r.view(buf) for r in plan.act]
        self.reward = plan.reward.view(buf)
        self.terminated = plan.terminated.view(buf)
        self.truncated = plan.truncated.view(buf)
        self.info_version = plan.info_version.view(buf)
        self.info_blob = plan.info_blob.view(buf)
        self.info_values = plan.info_values.view(buf)
        self.info_present = plan.info_present.view(buf)
        self.info_arrays = plan.info_arrays.view(buf)

    def release(self) -> None:
        self.obs = self.act = []
        self.reward = self.terminated = self.truncated = None
        self.info_version = self.info_blob = self.info_values = self.info_present = None
        self.info_arrays = None


def write_leaf(dst: np.ndarray, leaf: Leaf, value: Any) -> None:
    """Write one env's leaf value into its slot row, as SyncVectorEnv's concatenate would."""
    arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.shape != leaf.shape:
        raise SpaceMismatchError(
            f"shape {arr.shape} does not fit {leaf.space} (expects {leaf.shape})"
            + (f" at {'/'.join(map(str, leaf.path))}" if leaf.path else ""))
    if arr.dtype == leaf.dtype:
        _raster.copy_into(dst, arr)
        return
    try:
        np.copyto(dst, arr, casting="same_kind")
    except TypeError as exc:
        raise SpaceMismatchError(
            f"dtype {arr.dtype} does not fit {leaf.space} (dtype {leaf.dtype})"
            + (f" at {'/'.join(map(str, leaf.path))}" if leaf.path else "")) from exc


def check_actions(act_leaves: list[Leaf], flat: list, num_envs: int) -> list[np.ndarray]:
    """Validate a flattened batch of actions; returns them as arrays. Raises InvalidActionError."""
    out = []
    for leaf, value in zip(act_leaves, flat):
        if leaf.pickled:  # no fixed size: as gymnasium, one item per env, unchecked
            items = split_pickled(leaf.space, value)
            if len(items) != num_envs:
                raise InvalidActionError(
                    f"actions for {leaf.space} have {len(items)} items; {num_envs} envs need "
                    f"{num_envs}")
            out.append(items)
            continue
        if np.ndim(value) == 0:
            raise ActionBatchTypeError(
                f"a single action {value!r} was passed where a batch of {num_envs} actions "
                f"of {leaf.space} is needed (one per env)")
        arr = np.asarray(value)
        where = f" at {'/'.join(map(str, leaf.path))}" if leaf.path else ""
        want = (num_envs, *leaf.shape)
        if arr.shape != want:
            raise InvalidActionError(
                f"actions{where} have shape {arr.shape}; the batched action space "
                f"needs {want} ({num_envs} envs x {leaf.space})")
        if arr.dtype != leaf.dtype and not np.can_cast(arr.dtype, leaf.dtype, casting="same_kind"):
            raise InvalidActionError(
                f"actions{where} have dtype {arr.dtype}, which cannot be cast to {leaf.dtype} "
                f"of {leaf.space}")
        if not _all_in_space(leaf.space, arr):
            bad = ~_in_space(leaf.space, arr)
            first = int(np.flatnonzero(bad)[0])
            raise InvalidActionError(
                f"action{where} of env {first} is outside {leaf.space}: {arr[first]!r} "
                f"({int(bad.sum())} of {num_envs} envs out of bounds)")
        out.append(arr)
    return out


def split_pickled(space: spaces.Space, value) -> list:
    """One item per env of a batch of a space without a fixed size (gymnasium batches those
    as a tuple, one item per env)."""
    if isinstance(value, (tuple, list)):
        return list(value)
    return list(iterate(space, value))


def _all_in_space(space: spaces.Space, arr: np.ndarray) -> bool:
    """Fast check of a whole batch on the step path (the common case: all valid)."""
    if arr.size == 0:
        return True
    if isinstance(space, spaces.Discrete) and arr.dtype.kind in "iu":
        lo, hi = int(space.start), int(space.start + space.n - 1)
        if arr.dtype == np.int64 and arr.flags.c_contiguous:  # the common batch: one pass in C
            return _raster.all_within(arr.reshape(-1), lo, hi)
        return bool(lo <= arr.min() and arr.max() <= hi)
    if isinstance(space, spaces.MultiBinary) and arr.dtype.kind in "iub":
        return bool(0 <= arr.min() and arr.max() <= 1)
    return bool(_in_space(space, arr).all())


def _in_space(space: spaces.Space, arr: np.ndarray) -> np.ndarray:
    """Per-env membership of a batched leaf (env axis first)."""
    axes = tuple(range(1, arr.ndim))
    if isinstance(space, spaces.Box):
        ok = (arr >= space.low) & (arr <= space.high)
    elif isinstance(space, spaces.Discrete):
        ok = (arr >= space.start) & (arr < space.start + space.n) & (arr == np.floor(arr))
    elif isinstance(space, spaces.MultiDiscrete):
        ok = (arr >= space.start) & (arr < space.start + space.nvec) & (arr == np.floor(arr))
    elif isinstance(space, spaces.MultiBinary):
        ok = (arr == 0) | (arr == 1)
    else:  # pragma: no cover - leaves() admits only the four above
        raise UnsupportedSpaceError(str(space))
    return np.all(ok, axis=axes) if axes else ok
