"""Typed info columns: numeric info values in shared memory instead of pickles.

An env's info dict (``{"burned_cells": 812, "sim_minutes": 30.0}``) would otherwise be
pickled into the worker's side buffer every step and unpickled by the parent. Keys whose
values are numeric scalars get a *column* instead: 8 bytes per ring slot and env plus a
presence byte, in the main segment (layout.Plan: ``info_values``/``info_present``).

    parent                                   worker (fastvec/_stepper.pyx InfoWriter)
    schema: [(key, type)], published  ──▶    reads it when info_version changed; for every
    between requests (blob + version)        env it answers: value of `key` with exactly
                                             `type` -> column c, present[c] = 1; the rest of
    batch: one array + `_key` mask     ◀──   the dict (other keys, other types) pickled
    per column, as gymnasium builds them

Columns are declared (``FastVectorEnv(info_spec={"burned_cells": int, ...})``) or learned:
a key that arrives pickled with a learnable value (``int``, ``float``, ``bool`` or a numpy
integer/float scalar of at most 8 bytes, but not ``uint64``: what ``_add_info`` batches
into a typed array) gets a column at the next point where no request is in flight.
Values are stored as int64 or float64 and read back into the dtype gymnasium would pick
(``np.zeros(n, dtype=type(value))``), which round-trips exactly. A value whose type differs
from its column's stays pickled; a step where a key arrives both ways is batched env by
env as gymnasium does, so results equal SyncVectorEnv's in every case.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

import numpy as np

from fastvec.errors import FastVecError

COLUMNS = 16  # column capacity; keys beyond it stay pickled
BLOB_BYTES = 4096  # the pickled schema: [(key, type), ...] after an 8-byte length
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


def _declared_type(key: str, t) -> type:
    if isinstance(t, np.dtype) or (isinstance(t, str)):
        t = np.dtype(t).type
    if not isinstance(t, type) or not learnable(t(0)):
        raise ValueError(f"info_spec[{key!r}] must be int, float, bool or a numpy integer or "
                         f"float type of at most 8 bytes (not uint64), got {t!r}")
    return t


def check_spec(spec: dict | None) -> dict:
    """Validate ``info_spec`` ({key: type of the value the env returns})."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise ValueError(f"info_spec must be a dict of str keys to types, got {spec!r}")
    if len(spec) > COLUMNS:
        raise ValueError(f"info_spec declares {len(spec)} keys; at most {COLUMNS} get columns")
    out = {k: _declared_type(k, t) for k, t in spec.items()}
    if "final_obs" in out or "final_info" in out:
        raise ValueError("info_spec cannot declare final_obs / final_info")
    return out


def encode_schema(schema: list[tuple[str, type]]) -> bytes:
    blob = pickle.dumps(schema, protocol=pickle.HIGHEST_PROTOCOL)
    if len(blob) + 8 > BLOB_BYTES:
        raise FastVecError(f"info schema of {len(schema)} keys does not fit {BLOB_BYTES} bytes")
    return struct.pack("<Q", len(blob)) + blob


def decode_schema(raw) -> list[tuple[str, type]]:
    (n,) = struct.unpack_from("<Q", raw, 0)
    return pickle.loads(bytes(raw[8:8 + n])) if n else []


class InfoColumns:
    """The parent's side: the schema it publishes, learning, and reading columns back."""

    def __init__(self, views, num_envs: int, declared: dict | None = None):
        self.views = views
        self.num_envs = num_envs
        self.keys: list[str] = []
        self.types: list[type] = []
        self.index: dict[str, int] = {}
        self.pending: list[tuple[str, type]] = []
        self.version = 0
        for key, t in (declared or {}).items():
            self._add(key, t)
        self._write()

    @property
    def n(self) -> int:
        return len(self.keys)

    def _add(self, key: str, t: type) -> None:
        self.index[key] = len(self.keys)
        self.keys.append(key)
        self.types.append(t)

    def _write(self) -> None:
        blob = encode_schema(list(zip(self.keys, self.types)))
        v = self.views
        v.info_blob[:len(blob)] = np.frombuffer(blob, np.uint8)
        self.version += 1
        v.info_version[0] = self.version  # workers reload when it changes

    def learn(self, info: dict) -> None:
        """Note the learnable keys of an info that arrived pickled (published later)."""
        for key, value in info.items():
            if (key not in self.index and key not in ("final_obs", "final_info")
                    and learnable(value) and self.n + len(self.pending) < COLUMNS
                    and all(key != k for k, _ in self.pending)):
                self.pending.append((key, type(value)))

    def publish(self) -> None:
        """Give the noted keys columns. Call only while no request is in flight: workers
        read the schema when a request starts."""
        if self.pending:
            for key, t in self.pending:
                self._add(key, t)
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
            t = self.types[c]
            src = (vals_f if kind_of(t) == _KIND_FLOAT else vals_i)[:, c]
            arr = np.zeros(self.num_envs, dtype=t)
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
            raw = row[c:c + 1]
            value = raw.view(np.float64)[0] if kind_of(t) == _KIND_FLOAT else raw[0]
            out[self.keys[c]] = t(value)
        return out
