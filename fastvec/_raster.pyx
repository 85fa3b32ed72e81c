"""Thin wrapper of csrc/raster.h: copies of raster buffers without the GIL.

Arguments are any objects with the buffer protocol (numpy arrays of 1.26 or 2.x,
memoryviews, mmaps); shapes, item sizes and formats are checked with the GIL held,
the bytes move inside ``with nogil``.
"""
from cpython.buffer cimport (PyBUF_RECORDS, PyBUF_RECORDS_RO, PyBuffer_Release,
                             PyObject_GetBuffer)
from libc.stdint cimport int64_t

from fastvec._raster cimport *


cdef str _fmt(const Py_buffer *b):
    """Kind of the items ('i' signed, 'u' unsigned, 'f' float, '?' bool, else the format).

    Format letters differ for equal dtypes (int64 is 'l' or 'q'); the item size is
    compared separately.
    """
    f = (<bytes>b.format).decode() if b.format != NULL else "B"
    # '@', '=' and '<' mean the same on the little-endian machines we build for.
    f = f.lstrip("@=<")
    if len(f) == 1:
        if f in "bhilqn":
            return "i"
        if f in "BHILQN":
            return "u"
        if f in "efd":
            return "f"
    return f


cdef int _raise(int rc) except -1:
    if rc == FV_RASTER_BAD_NDIM:
        raise ValueError(f"arrays of more than {FV_RASTER_MAX_NDIM} dimensions are not supported")
    if rc != FV_RASTER_OK:
        raise ValueError("bad arguments to a raster kernel")
    return 0


def copy_into(dst, src):
    """Copy ``src`` into ``dst`` element by element (same shape, same dtype; any strides)."""
    cdef Py_buffer d, s
    cdef int64_t shape[FV_RASTER_MAX_NDIM]
    cdef int64_t ds[FV_RASTER_MAX_NDIM]
    cdef int64_t ss[FV_RASTER_MAX_NDIM]
    cdef int k, rc, ndim
    PyObject_GetBuffer(dst, &d, PyBUF_RECORDS)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_RECORDS_RO)
        try:
            if d.ndim != s.ndim:
                raise ValueError(f"copy_into: {s.ndim}-d source into a {d.ndim}-d destination")
            if d.ndim > FV_RASTER_MAX_NDIM:
                _raise(FV_RASTER_BAD_NDIM)
            if d.itemsize != s.itemsize or _fmt(&d) != _fmt(&s):
                raise TypeError(f"copy_into: item format {_fmt(&s)!r} into {_fmt(&d)!r}; "
                                "cast first")
            ndim = d.ndim
            for k in range(ndim):
                if d.shape[k] != s.shape[k]:
                    raise ValueError("copy_into: shape "
                                     f"{tuple(s.shape[i] for i in range(ndim))} into "
                                     f"{tuple(d.shape[i] for i in range(ndim))}")
                shape[k] = d.shape[k]
                ds[k] = d.strides[k]
                ss[k] = s.strides[k]
            with nogil:
                rc = fv_copy_strided(<char *>d.buf, ds, <const char *>s.buf, ss, shape, ndim,
                                     d.itemsize)
            _raise(rc)
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&d)


def gather_rows(dst, src, const int64_t[::1] rows):
    """``dst[i] = src[rows[i]]`` for contiguous rows; dst is C-contiguous, src rows are."""
    cdef Py_buffer d, s
    cdef int64_t row_bytes, nrows = rows.shape[0]
    cdef int rc
    PyObject_GetBuffer(dst, &d, PyBUF_RECORDS)
    try:
        PyObject_GetBuffer(src, &s, PyBUF_RECORDS_RO)
        try:
            if s.ndim < 1 or d.ndim != s.ndim or d.shape[0] != nrows:
                raise ValueError("gather_rows: dst must have len(rows) rows and src's ndim")
            if d.itemsize != s.itemsize or _fmt(&d) != _fmt(&s):
                raise TypeError("gather_rows: item formats differ")
            row_bytes = d.itemsize
            for k in range(1, d.ndim):
                if d.shape[k] != s.shape[k]:
                    raise ValueError("gather_rows: row shapes differ")
                row_bytes *= d.shape[k]
            if not _row_contiguous(&d, row_bytes, True) or not _row_contiguous(&s, row_bytes, False):
                raise ValueError("gather_rows: rows must be contiguous (and dst C-contiguous)")
            with nogil:
                rc = fv_gather_rows(<char *>d.buf, <const char *>s.buf, row_bytes,
                                    s.strides[0] if s.ndim else 0, &rows[0] if nrows else NULL,
                                    nrows, s.shape[0])
            if rc != FV_RASTER_OK:
                raise IndexError(f"gather_rows: a row index is outside 0..{s.shape[0] - 1}")
        finally:
            PyBuffer_Release(&s)
    finally:
        PyBuffer_Release(&d)


cdef bint _row_contiguous(const Py_buffer *b, int64_t row_bytes, bint whole):
    cdef int64_t expect = b.itemsize
    cdef int k
    for k in range(b.ndim - 1, 0, -1):
        if b.shape[k] > 1 and b.strides[k] != expect:
            return False
        expect *= b.shape[k]
    if whole and b.ndim and b.shape[0] > 1 and b.strides[0] != row_bytes:
        return False
    return True


def all_within(const int64_t[::1] values, int64_t lo, int64_t hi):
    """Whether every value lies in [lo, hi] (a batch of Discrete actions: one pass
    instead of two numpy reductions)."""
    cdef Py_ssize_t i
    for i in range(values.shape[0]):
        if values[i] < lo or values[i] > hi:
            return False
    return True
