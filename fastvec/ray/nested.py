"""Batched structures (arrays, or dicts and tuples of them, as gymnasium's spaces batch):
actions conformed to a space and sliced per actor, the actors' parts joined into one batch,
and their batched infos placed at their rows."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from gymnasium import spaces


def conform(space: spaces.Space, x):
    """``x`` with the structure of ``space`` and arrays of its dtypes (TypeError, ValueError
    or KeyError when it does not fit)."""
    if isinstance(space, spaces.Dict):
        if not isinstance(x, Mapping):
            raise TypeError(f"expected a dict, got {type(x).__name__}")
        return {k: conform(sub, x[k]) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        if not isinstance(x, (tuple, list)) or len(x) != len(space.spaces):
            raise TypeError(f"expected a tuple of {len(space.spaces)}")
        return tuple(conform(sub, v) for sub, v in zip(space.spaces, x))
    a = np.asarray(x)
    want = space.dtype
    if want is not None and a.dtype != want:
        ok = "biuf" if want.kind == "f" else "biu" if want.kind in "iub" else ""
        if a.dtype.kind not in ok:
            raise TypeError(f"dtype {a.dtype} cannot become {want}")
        a = a.astype(want)
    return a


def rows(x, lo: int, hi: int):
    """Rows ``lo..hi`` of every leaf (views)."""
    if isinstance(x, dict):
        return {k: rows(v, lo, hi) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(rows(v, lo, hi) for v in x)
    return x[lo:hi]


def take(x, order):
    """The rows of every leaf in ``order``."""
    if isinstance(x, dict):
        return {k: take(v, order) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(take(v, order) for v in x)
    return x[order]


def row(x, j: int):
    """Row ``j`` of every leaf, copied (one env's observation)."""
    if isinstance(x, dict):
        return {k: row(v, j) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(row(v, j) for v in x)
    return np.array(x[j])


def concat(parts: list):
    """One batch from the actors' batches: a fresh, writable array per leaf."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: concat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(concat([p[i] for p in parts]) for i in range(len(first)))
    return np.concatenate(parts) if len(parts) > 1 else np.array(first)


def merge_infos(dst: dict, src: dict, lo: int, n: int) -> dict:
    """Place an actor's batched infos (over its k envs) at rows ``lo..lo+k`` of a batch of
    ``n``: arrays and ``_key`` masks as gymnasium's ``_add_info`` builds them env by env."""
    for key, value in src.items():
        if key.startswith("_") and key[1:] in src:
            continue  # a mask; handled with its key
        mask = src.get(f"_{key}")
        if isinstance(value, dict):
            dst[key] = merge_infos(dst.get(key, {}), value, lo, n)
        else:
            k = len(value)
            arr = dst.get(key)
            if arr is None:
                arr = (np.full((n, *value.shape[1:]), None, object) if value.dtype == object
                       else np.zeros((n, *value.shape[1:]), value.dtype))
            arr[lo:lo + k] = value
            dst[key] = arr
        if mask is not None:
            m = dst.get(f"_{key}")
            if m is None:
                m = np.zeros(n, np.bool_)
            m[lo:lo + len(mask)] = mask
            dst[f"_{key}"] = m
    return dst
