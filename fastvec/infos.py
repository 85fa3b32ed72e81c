"""Typed info columns: numeric info values in shared memory instead of pickles.

An env's info dict (``{"burned_cells": 812, "sim_minutes": 30.0}``) would otherwise be
pickled into the worker's side buffer every step and unpickled by the parent. Keys whose
values are numeric scalars or fixed-shape numeric arrays get a *column* instead, in the
main segment (layout.Plan): a scalar takes 8 bytes per ring slot and env
(``info_values``), an array its own bytes of the ``info_arrays`` arena (ARRAY_BYTES per
ring slot and env, shared by all array columns); each column has a presence byte
(``info_present``).

    parent                                   worker (fastvec/_stepper.pyx InfoWriter)
    schema: [(key, type, shape)],     ──▶    reads it when info_version changed; for every
    published between requests               env it answers: value of `key` with exactly
    (blob + version)                         `type` (and `shape`) -> column c, present[c]
                                             = 1; the rest of the dict (other keys, other
    batch: one array + `_key` mask     ◀──   types or shapes) pickled
    per column, as gymnasium builds them

Columns are declared (``FastVectorEnv(info_spec={"burned_cells": int, "heat": (np.float32,
(8,)), ...})``) or learned: a key that arrives pickled with a learnable value gets a column
at the next point where no request is in flight. Learnable: ``int``, ``float``, ``bool``, a
numpy integer/float scalar of at most 8 bytes but not ``uint64`` (what ``_add_info``
batches into a typed array), or an ``np.ndarray`` of booleans, integers or floats that fits
what is left of the arena. Scalars are stored as int64 or float64 and read back into the
dtype gymnasium picks (``np.zeros(n, dtype=type(value))``), which round-trips exactly;
arrays are stored as their bytes and batched as gymnasium batches them
(``np.zeros((n, *shape), dtype)``). A value whose type or shape differs from its column's
stays pickled; a step where a key arrives both ways is batched env by env as gymnasium
does, so results equal SyncVectorEnv's in every case.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import numpy as np

from fastvec.contract import InfoBatcher
from fastvec.errors import FastVecError
from fastvec.shm import get_pickle

COLUMNS = 16  # column capacity; keys beyond it stay pickled
BLOB_BYTES = 4096  # the pickled schema: [(key, type, shape), ...] after an 8-byte length
ARRAY_BYTES = 1024  # the array columns' arena, per ring slot and env
_KIND_INT, _KIND_FLOAT = 0, 1


def learnable(value: Any) -> bool:
    """Whether gymnasium batches ``value`` into a typed array that a column can hold."""
    t = type(value)
    if t in (int, float, bool):
        return True
    return (issubclass(t, np.number) and not issubclass(t, np.complexfloating)
            and np.dtype(t).itemsize <= 8 and t is not np.uint64)


def kind_of(t: type) -> int:
    return _KIND_FLOAT if t is float or issubclass(t, np.floating) else _KIND_INT


def learnable_array(value: Any) -> bool:
    """Whether ``value`` is an array gymnasium batches into ``(n, *shape)`` of its dtype,
    of a kind a column holds (booleans, integers, floats), small enough for the arena."""
    return (type(value) is np.ndarray and value.dtype.kind in "biuf"
            and value.dtype.isnative and value.nbytes <= ARRAY_BYTES)


def column_of(value: Any) -> tuple[type, tuple | None] | None:
    """(type, shape) of the column that holds ``value`` (shape None: a scalar), or None."""
    if learnable(value):
        return type(value), None
    if learnable_array(value):
        return value.dtype.type, value.shape
    return None


def array_bytes(t: type, shape: tuple) -> int:
    """Bytes an array column takes in the arena, rounded up to 8 (aligned columns)."""
    return -(-np.dtype(t).itemsize * int(np.prod(shape, dtype=np.int64)) // 8) * 8


def _declared(key: str, t) -> tuple[type, tuple | None]:
    if isinstance(t, tuple) and len(t) == 2:  # an array: (dtype, shape)
        dtype, shape = t
        try:
            dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
        except TypeError:
            dtype = None
        if (dtype is None or dtype.kind not in "biuf" or any(d < 0 for d in shape)
                or array_bytes(dtype.type, shape) > ARRAY_BYTES):
            raise ValueError(f"info_spec[{key!r}]: an array column is (dtype, shape) of a bool, "
                             f"integer or float dtype within {ARRAY_BYTES} bytes, got {t!r}")
        return dtype.type, shape
    if isinstance(t, np.dtype) or (isinstance(t, str)):
        t = np.dtype(t).type
    if not isinstance(t, type) or not learnable(t(0)):
        raise ValueError(f"info_spec[{key!r}] must be int, float, bool, a numpy integer or "
                         f"float type of at most 8 bytes (not uint64), or (dtype, shape) of an "
                         f"array, got {t!r}")
    return t, None


def check_spec(spec: dict | None) -> dict:
    """Validate ``info_spec`` ({key: type of the value the env returns, or (dtype, shape)
    of an array}); returns {key: (type, shape or None)}."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise ValueError(f"info_spec must be a dict of str keys to types, got {spec!r}")
    if len(spec) > COLUMNS:
        raise ValueError(f"info_spec declares {len(spec)} keys; at most {COLUMNS} get columns")
    out = {k: _declared(k, t) for k, t in spec.items()}
    if "final_obs" in out or "final_info" in out:
        raise ValueError("info_spec cannot declare final_obs / final_info")
    used = sum(array_bytes(t, shape) for t, shape in out.values() if shape is not None)
    if used > ARRAY_BYTES:
        raise ValueError(f"info_spec's arrays take {used} bytes; the arena holds {ARRAY_BYTES} "
                         f"per env (declare fewer, or let the rest travel pickled)")
    return out


def encode_schema(schema: list[tuple[str, type, tuple | None, int]]) -> bytes:
    blob = pickle.dumps(schema, protocol=pickle.HIGHEST_PROTOCOL)
    if len(blob) + 8 > BLOB_BYTES:
        raise FastVecError(f"info schema of {len(schema)} keys does not fit {BLOB_BYTES} bytes")
    return struct.pack("<Q", len(blob)) + blob


def decode_schema(raw) -> list[tuple[str, type, tuple | None, int]]:
    """[(key, type, shape or None, arena offset)] as the parent published it."""
    (n,) = struct.unpack_from("<Q", raw, 0)
    return pickle.loads(bytes(raw[8:8 + n])) if n else []


class InfoColumns:
    """The parent's side: the schema it publishes, learning, and reading columns back."""

    def __init__(self, views, num_envs: int, declared: dict | None = None):
        self.views = views
        self.num_envs = num_envs
        self.keys: list[str] = []
        self.types: list[type] = []
        self.shapes: list[tuple | None] = []
        self.offsets: list[int] = []  # arena offset of each array column (-1: a scalar)
        self.arrays: dict[int, np.ndarray] = {}  # column -> (depth, n, *shape) view
        self.used = 0  # arena bytes taken
        self.index: dict[str, int] = {}
        self.pending: list[tuple[str, type, tuple | None]] = []
        self.version = 0
        for key, (t, shape) in (declared or {}).items():
            self._add(key, t, shape)
        self._write()

    @property
    def n(self) -> int:
        return len(self.keys)

    def _fits(self, t: type, shape: tuple | None, extra: int = 0) -> bool:
        return shape is None or self.used + extra + array_bytes(t, shape) <= ARRAY_BYTES

    def _add(self, key: str, t: type, shape: tuple | None) -> None:
        c = len(self.keys)
        self.index[key] = c
        self.keys.append(key)
        self.types.append(t)
        self.shapes.append(shape)
        if shape is None:
            self.offsets.append(-1)
            return
        self.offsets.append(self.used)
        self.arrays[c] = array_view(self.views.info_arrays, self.used, t, shape)
        self.used += array_bytes(t, shape)

    def _write(self) -> None:
        blob = encode_schema(list(zip(self.keys, self.types, self.shapes, self.offsets)))
        v = self.views
        v.info_blob[:len(blob)] = np.frombuffer(blob, np.uint8)
        self.version += 1
        v.info_version[0] = self.version  # workers reload when it changes

    def learn(self, info: dict) -> None:
        """Note the learnable keys of an info that arrived pickled (published later)."""
        for key, value in info.items():
            if (key in self.index or key in ("final_obs", "final_info")
                    or self.n + len(self.pending) >= COLUMNS
                    or any(key == k for k, _, _ in self.pending)):
                continue
            col = column_of(value)
            if col is None:
                continue
            extra = sum(array_bytes(t, sh) for _, t, sh in self.pending if sh is not None)
            if self._fits(*col, extra):
                self.pending.append((key, *col))

    def publish(self) -> None:
        """Give the noted keys columns. Call only while no request is in flight: workers
        read the schema when a request starts."""
        if self.pending:
            for key, t, shape in self.pending:
                self._add(key, t, shape)
            self.pending = []
            self._write()

    def collides(self, infos: list[dict]) -> bool:
        """Whether a pickled info carries a key that has a column (a value of another type)."""
        return any(key in self.index for info in infos for key in info)

    def batch(self, r: int, infos: dict) -> None:
        """Every env's column values of ring slot ``r`` into ``infos``, as gymnasium's
        ``_add_info`` would batch them (one array per key, a ``_key`` mask)."""
        n = self.n
        if not n:
            return
        present = self.views.info_present[r, :, :n]
        if not present.any():
            return
        vals_i = self.views.info_values[r]
        vals_f = vals_i.view(np.float64)
        for c in range(n):
            mask = present[:, c].astype(np.bool_)
            if not mask.any():
                continue
            t, shape = self.types[c], self.shapes[c]
            if shape is None:
                src = (vals_f if kind_of(t) == _KIND_FLOAT else vals_i)[:, c]
                arr = np.zeros(self.num_envs, dtype=t)
            else:
                src = self.arrays[c][r]
                arr = np.zeros((self.num_envs, *shape), dtype=t)
            arr[mask] = src[mask]
            infos[self.keys[c]] = arr
            infos["_" + self.keys[c]] = mask

    def env_info(self, r: int, i: int) -> dict:
        """Env ``i``'s column values of ring slot ``r``, as the values the env returned."""
        n = self.n
        if not n:
            return {}
        present = self.views.info_present[r, i, :n]
        if not present.any():
            return {}
        row = self.views.info_values[r, i]
        out = {}
        for c in np.flatnonzero(present):
            t = self.types[c]
            if self.shapes[c] is not None:
                out[self.keys[c]] = self.arrays[c][r, i].copy()
                continue
            raw = row[c:c + 1]
            value = raw.view(np.float64)[0] if kind_of(t) == _KIND_FLOAT else raw[0]
            out[self.keys[c]] = t(value)
        return out



def array_view(arena: np.ndarray, offset: int, t: type, shape: tuple) -> np.ndarray:
    """Column view ``(depth, num_envs, *shape)`` of ``t`` over the arena's bytes
    ``[offset, offset + nbytes)`` of every ring slot and env."""
    dtype = np.dtype(t)
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    depth, n = arena.shape[:2]
    out = arena[:, :, offset:offset + nbytes].view(dtype)
    out.shape = (depth, n, *shape)  # raises rather than copy: writes must reach the arena
    return out


class ReplyInfos(InfoBatcher):
    """Reads the infos of reset/step replies: the typed columns, then what came pickled in
    each worker's side buffer (the rest of the infos, and the values of observation leaves
    without a fixed size, which go to ``pickled_obs[ring][env]``); batched over every env
    as gymnasium batches them."""

    def __init__(self, columns: InfoColumns, pickled_obs: list, num_envs: int):
        super().__init__(num_envs)
        self.columns = columns
        self.pickled_obs = pickled_obs
        #: env -> how its latest episode began, and its latest snapshot, as replies
        #: reported them (for the episode log, fastvec/episodes.py, which takes them)
        self.starts: dict = {}
        self.snapshots: dict = {}

    def take_notes(self) -> tuple[dict, dict]:
        """The episode starts and snapshots noted since the last call."""
        notes = (self.starts, self.snapshots)
        self.starts, self.snapshots = {}, {}
        return notes

    def _note_starts(self, slot, notes) -> None:
        if notes is not None:
            for i, note in zip(slot.env_indices, notes):
                if note is not None:
                    start, snapshot = note
                    if start is not None:
                        self.starts[i] = start
                        self.snapshots.pop(i, None)
                    if snapshot is not None:
                        self.snapshots[i] = snapshot

    def collect(self, slot, infos: dict, r: int) -> None:
        """Add the infos of ``slot``'s reply in ring slot ``r`` to ``infos``, env by env."""
        n = slot.ctl.resp_payload_len
        got, pobs, starts = get_pickle(slot.payload, n) if n else (None, None, None)
        self._note_starts(slot, starts)
        cols = self.columns
        for j, i in enumerate(slot.env_indices):
            info = got[j] if got else None
            if info:
                cols.learn(info)
            if cols.n:  # typed values in shared memory, env by env
                typed = cols.env_info(r, i)
                if typed:
                    info = {**typed, **info} if info else typed
            if info:
                self._add_info(infos, info, i)
            if pobs is not None and pobs[j] is not None:
                self.pickled_obs[r][i] = pobs[j]

    def keep_final(self, slot, infos: dict) -> None:
        """SAME_STEP recycling: keep the old worker's final_obs / final_info only."""
        n = slot.ctl.resp_payload_len
        if not n:
            return
        got, _, _ = get_pickle(slot.payload, n)
        for i, info in zip(slot.env_indices, got):
            if info:
                self._add_info(infos, {key: info[key] for key in ("final_obs", "final_info")
                                       if key in info}, i)

    def step(self, slots: list, r: int) -> dict:
        """Every env's infos of ring slot ``r``: the typed columns in a few array
        operations, then what came pickled. If a key came both ways (a value whose type
        differs from its column's), env by env instead, so the arrays' dtypes are the ones
        gymnasium's ``_add_info`` picks."""
        cols = self.columns
        pickled: dict[int, dict] = {}
        for slot in slots:
            n = slot.ctl.resp_payload_len
            if not n:
                continue
            got, pobs, starts = get_pickle(slot.payload, n)
            self._note_starts(slot, starts)
            for j, i in enumerate(slot.env_indices):
                if got[j]:
                    pickled[i] = got[j]
                    cols.learn(got[j])
                if pobs[j] is not None:
                    self.pickled_obs[r][i] = pobs[j]
        infos: dict = {}
        if cols.n and pickled and cols.collides(list(pickled.values())):
            for i in range(self.num_envs):
                info = {**cols.env_info(r, i), **pickled.get(i, {})}
                if info:
                    self._add_info(infos, info, i)
            return infos
        cols.batch(r, infos)
        for i in sorted(pickled):
            self._add_info(infos, pickled[i], i)
        return infos
