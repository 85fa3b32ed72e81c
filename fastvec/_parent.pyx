"""The parent's side of the step path, compiled.

``ActionWriter.send`` is step_async's common case in one call: for a space with one
fixed-size leaf (a Box, Discrete, MultiDiscrete or MultiBinary at the top level) and a
batch that is a C-contiguous array of exactly the leaf's dtype and batch shape, it checks
the bounds in one pass (csrc/actions.c), copies the batch into the shared action rows and
the failure log's history with memcpy, arms the batch and posts every worker
(``StepPath.send``, csrc/ring.c). Anything else (a list, another dtype, a strided view, a
value out of bounds) returns False having written and posted nothing, and
``FastVectorEnv.step_async`` takes the Python path, which casts what gymnasium casts and
words the error.

``Results.get`` is step_wait's common return: the observation batch (a view, or one copy),
rewards and flags of a ring slot, for a space with one fixed observation leaf.
"""
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from fastvec._ring cimport StepPath

import numpy as np
from gymnasium import spaces

cdef extern from "actions.h" nogil:
    ctypedef enum fv_elem:
        FV_I8, FV_I16, FV_I32, FV_I64, FV_U8, FV_U16, FV_U32, FV_U64, FV_F32, FV_F64
    int64_t fv_first_out_of_bounds(fv_elem type, const void *values, int64_t n,
                                   int64_t width, const void *lo, const void *hi)

cdef object _ndarray = np.ndarray
cdef dict _ELEM = {np.dtype(t): e for t, e in (
    ("int8", FV_I8), ("int16", FV_I16), ("int32", FV_I32), ("int64", FV_I64),
    ("uint8", FV_U8), ("uint16", FV_U16), ("uint32", FV_U32), ("uint64", FV_U64),
    ("float32", FV_F32), ("float64", FV_F64))}
# Batches at least this large are checked and copied with the GIL released.
cdef Py_ssize_t _NOGIL_BYTES = 65536


def bounds(space, dtype):
    """(lo, hi): one bound per value of an action of ``space``, C order, as arrays of
    ``dtype``; None when ``space`` has no kernel (the Python path checks it)."""
    dtype = np.dtype(dtype)
    if dtype not in _ELEM:
        return None
    if isinstance(space, spaces.Box):
        lo, hi = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
    elif isinstance(space, spaces.Discrete):
        lo, hi = np.array([space.start]), np.array([space.start + space.n - 1])
    elif isinstance(space, spaces.MultiDiscrete):
        lo, hi = space.start, space.start + space.nvec - 1
    elif isinstance(space, spaces.MultiBinary):
        lo, hi = np.zeros(space.shape), np.ones(space.shape)
    else:
        return None
    lo, hi = np.asarray(lo), np.asarray(hi)
    # a bound the dtype cannot hold exactly (an int64 start past a float's range) is left
    # to the Python path rather than rounded here
    clo, chi = lo.astype(dtype), hi.astype(dtype)
    if not (np.array_equal(clo, lo) and np.array_equal(chi, hi)):
        return None
    return np.ascontiguousarray(clo).reshape(-1), np.ascontiguousarray(chi).reshape(-1)


cdef class ActionWriter:
    """Check and store batches of actions of one fixed leaf (see the module docstring)."""

    cdef object dtype
    cdef tuple shape
    cdef fv_elem elem
    cdef bint check
    cdef object lo, hi
    cdef const unsigned char[::1] lo_raw, hi_raw
    cdef unsigned char[::1] rows
    cdef unsigned char[:, ::1] history
    cdef Py_ssize_t nbytes, num_envs, width

    def __cinit__(self, leaf, view, history, bint check):
        """``view``: the shared action rows (num_envs, *leaf.shape); ``history``: the
        failure log's last actions (4, num_envs, *leaf.shape); ``check``: validate bounds."""
        self.dtype = np.dtype(leaf.dtype)
        self.shape = tuple(view.shape)
        self.num_envs = view.shape[0]
        self.nbytes = view.nbytes
        self.width = view.size // max(self.num_envs, 1)
        self.rows = view.reshape(-1).view(np.uint8)
        self.history = history.reshape(4, -1).view(np.uint8)
        self.check = check
        b = bounds(leaf.space, self.dtype) if check else None
        if check and b is None:
            raise ValueError(f"no action kernel for {leaf.space} of dtype {self.dtype}")
        self.elem = _ELEM.get(self.dtype, FV_I64)
        if b is not None:
            self.lo, self.hi = b
            self.lo_raw = self.lo.view(np.uint8)
            self.hi_raw = self.hi.view(np.uint8)

    cpdef bint send(self, StepPath path, object actions, Py_ssize_t h, uint32_t epoch,
                    uint64_t first_seq, uint32_t opcode, uint32_t ring_index,
                    uint32_t flags) except -1:
        """Store ``actions`` (history row ``h``) and send the batch (see StepPath.send);
        or return False having stored and sent nothing."""
        if not self.write(actions, h):
            return False
        path.send(epoch, first_seq, opcode, ring_index, flags)
        return True

    cpdef bint write(self, object actions, Py_ssize_t h) except -1:
        """Store ``actions`` and return True, or return False having stored nothing."""
        cdef Py_buffer b
        cdef int64_t bad = -1
        cdef char *dst
        cdef char *hist
        if (type(actions) is not _ndarray or actions.shape != self.shape
                or not (actions.dtype is self.dtype or actions.dtype == self.dtype)):
            return False
        try:
            PyObject_GetBuffer(actions, &b, PyBUF_C_CONTIGUOUS)
        except (BufferError, ValueError):
            return False  # strided
        try:
            if b.len != self.nbytes:
                return False
            dst = <char *>&self.rows[0] if self.nbytes else NULL
            hist = <char *>&self.history[h % 4, 0] if self.nbytes else NULL
            if self.nbytes >= _NOGIL_BYTES:
                with nogil:
                    bad = self._check_and_copy(<const char *>b.buf, dst, hist)
            else:
                bad = self._check_and_copy(<const char *>b.buf, dst, hist)
            return bad == -1
        finally:
            PyBuffer_Release(&b)

    cdef int64_t _check_and_copy(self, const char *src, char *dst, char *hist) noexcept nogil:
        cdef int64_t bad
        if self.nbytes == 0:
            return -1
        if self.check:
            bad = fv_first_out_of_bounds(self.elem, src, self.num_envs, self.width,
                                         &self.lo_raw[0], &self.hi_raw[0])
            if bad != -1:
                return bad
        memcpy(dst, src, self.nbytes)
        memcpy(hist, src, self.nbytes)
        return -1


cdef class Results:
    """step_wait's return for one fixed observation leaf: the ring slot's rows, copied
    (``copy=True``) or as views of shared memory."""

    cdef list obs, reward, terminated, truncated
    cdef bint copy

    def __cinit__(self, obs_region, reward, terminated, truncated, bint copy):
        depth = obs_region.shape[0]
        self.obs = [obs_region[r] for r in range(depth)]
        self.reward = [reward[r] for r in range(depth)]
        self.terminated = [terminated[r] for r in range(depth)]
        self.truncated = [truncated[r] for r in range(depth)]
        self.copy = copy

    cpdef tuple get(self, Py_ssize_t r):
        obs = self.obs[r]
        return (obs.copy() if self.copy else obs, self.reward[r].copy(),
                self.terminated[r].copy(), self.truncated[r].copy())
