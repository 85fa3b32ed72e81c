"""Known answers for the raster kernels (fastvec._raster over csrc/raster.c), plus a
property test against numpy for random shapes, strides and dtypes."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastvec._raster import copy_into, gather_rows

DTYPES = [np.uint8, np.float32, np.float64, np.bool_, np.int16, np.int64]


def sample(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        out = rng.integers(0, 2, shape).astype(bool)
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    else:
        out = rng.standard_normal(shape).astype(dtype)
    return np.array(out, dtype)


def guarded(shape, dtype, fill=7):
    """A destination inside a larger filled buffer, to catch writes outside it."""
    base = np.full((*shape[:-1], shape[-1] + 2) if shape else (3,), fill, dtype)
    view = base[..., 1:-1] if shape else base[1:2].reshape(())
    return base, view


# -- copy_into: known answers --------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous(dtype):
    src = sample((4, 5, 6), dtype)
    dst = np.zeros_like(src)
    copy_into(dst, src)
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_source_and_destination(dtype):
    hwc = sample((32, 32, 3), dtype)
    chw = np.zeros((3, 32, 32), dtype)
    copy_into(chw, hwc.transpose(2, 0, 1))
    np.testing.assert_array_equal(chw, hwc.transpose(2, 0, 1))
    back = np.zeros((32, 32, 3), dtype).transpose(2, 0, 1)  # strided destination
    copy_into(back, chw)
    np.testing.assert_array_equal(back.transpose(1, 2, 0), hwc)


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_strides(dtype):
    src = sample((5, 7), dtype)
    dst = np.zeros((5, 7), dtype)
    copy_into(dst, src[::-1, ::-1])
    np.testing.assert_array_equal(dst, src[::-1, ::-1])
    dst2 = np.zeros((5, 7), dtype)
    copy_into(dst2[::-1], src)  # negative strides on the destination
    np.testing.assert_array_equal(dst2, src[::-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_slices_with_steps(dtype):
    src = sample((9, 10, 11), dtype)
    view = src[1::2, ::3, 2:9:2]
    base, dst = guarded(view.shape, dtype, fill=1)
    copy_into(dst, view)
    np.testing.assert_array_equal(dst, view)
    np.testing.assert_array_equal(base[..., 0], np.ones(view.shape[:-1], dtype))
    np.testing.assert_array_equal(base[..., -1], np.ones(view.shape[:-1], dtype))
    big = np.zeros((9, 10, 11), dtype)
    copy_into(big[::4, 1::3, ::-5], src[:3, :3, :3])
    expect = np.zeros_like(big)
    expect[::4, 1::3, ::-5] = src[:3, :3, :3]
    np.testing.assert_array_equal(big, expect)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d(dtype):
    src = np.array(sample((), dtype))
    dst = np.zeros((), dtype)
    copy_into(dst, src)
    assert dst[()] == src[()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_d(dtype):
    src = sample((13,), dtype)
    dst = np.zeros(13, dtype)
    copy_into(dst, src)
    np.testing.assert_array_equal(dst, src)
    dst = np.zeros(7, dtype)
    copy_into(dst, src[::2])
    np.testing.assert_array_equal(dst, src[::2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_five_d(dtype):
    src = sample((3, 4, 2, 5, 6), dtype)
    view = src.transpose(4, 1, 0, 3, 2)[::-1, :, 1:, ::2, :]
    dst = np.zeros(view.shape, dtype)
    copy_into(dst, view)
    np.testing.assert_array_equal(dst, view)


def test_zero_sized_is_a_no_op():
    dst = np.full((0, 4), 3, np.uint8)
    copy_into(dst, np.zeros((0, 4), np.uint8))
    dst = np.full((2, 0, 3), 3, np.float32)
    copy_into(dst, np.zeros((2, 0, 3), np.float32))


def test_other_buffers_as_source():
    dst = np.zeros(5, np.uint8)
    copy_into(dst, b"hello")
    assert bytes(dst) == b"hello"
    copy_into(dst, bytearray(b"world"))
    assert bytes(dst) == b"world"
    copy_into(dst, memoryview(b"AxBxCxDxEx")[::2])  # a strided memoryview
    assert bytes(dst) == b"ABCDE"


def test_mmap_destination():
    mm = mmap.mmap(-1, 4096)
    try:
        view = np.frombuffer(mm, np.float32, 12, 64).reshape(3, 4)
        src = sample((4, 3), np.float32)
        copy_into(view, src.T)
        np.testing.assert_array_equal(view, src.T)
        np.testing.assert_array_equal(np.frombuffer(mm, np.uint8, 64), 0)
        del view
    finally:
        mm.close()


@pytest.mark.parametrize("a,b", [(np.int64, np.longlong), (np.uint64, np.ulonglong),
                                 (np.intc, np.int32), (np.float64, np.double)])
def test_equal_dtypes_spelled_differently_are_compatible(a, b):
    """numpy calls these dtypes equal (int64 is long, longlong is 'q'): the copy must work."""
    assert np.dtype(a) == np.dtype(b)
    src = np.arange(6, dtype=b).reshape(2, 3)
    dst = np.zeros((2, 3), a)
    copy_into(dst, src)
    np.testing.assert_array_equal(dst, src)


# -- copy_into: errors -----------------------------------------------------------------------


@pytest.mark.parametrize("dst,src", [
    (np.zeros((3, 4)), np.zeros((4, 3))),
    (np.zeros((3, 4)), np.zeros((3, 5))),
    (np.zeros((3, 4)), np.zeros(12)),
    (np.zeros(()), np.zeros(1)),
    (np.zeros((2, 2, 2)), np.zeros((2, 2))),
], ids=["swapped", "longer", "ndim", "0d-vs-1d", "3d-vs-2d"])
def test_shape_mismatch_is_a_value_error(dst, src):
    before = dst.copy()
    with pytest.raises(ValueError):
        copy_into(dst, src)
    np.testing.assert_array_equal(dst, before)


@pytest.mark.parametrize("dst_dtype,src_dtype", [
    (np.float32, np.float64), (np.float64, np.float32), (np.uint8, np.bool_),
    (np.bool_, np.uint8), (np.float32, np.int32), (np.int64, np.float64),
    (np.uint8, np.int8), (np.dtype("<f4"), np.dtype(">f4")),
])
def test_format_mismatch_is_a_type_error(dst_dtype, src_dtype):
    dst = np.zeros(4, dst_dtype)
    with pytest.raises(TypeError):
        copy_into(dst, np.ones(4, src_dtype))
    np.testing.assert_array_equal(dst, np.zeros(4, dst_dtype))


def test_read_only_destination_is_refused():
    dst = np.zeros(3)
    dst.flags.writeable = False
    with pytest.raises((BufferError, ValueError)):
        copy_into(dst, np.ones(3))
    with pytest.raises((BufferError, ValueError, TypeError)):
        copy_into(b"abc", np.ones(3, np.uint8))
    assert not dst.any()


def test_non_buffer_arguments_are_refused():
    with pytest.raises(TypeError):
        copy_into(np.zeros(3), [1.0, 2.0, 3.0])
    with pytest.raises(TypeError):
        copy_into([0, 0, 0], np.zeros(3))


def test_too_many_dimensions():
    try:
        src = np.zeros((1,) * 33, np.uint8)
    except ValueError:  # numpy 1.x caps arrays at 32 dims, the kernel's own limit
        pytest.skip("this numpy cannot build a 33-d array")
    with pytest.raises(ValueError):
        copy_into(np.zeros((1,) * 33, np.uint8), src)


# -- gather_rows -----------------------------------------------------------------------------


def rows_of(*values):
    return np.array(values, np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_rows_known_answer(dtype):
    src = sample((6, 3, 4), dtype)
    rows = rows_of(4, 0, 4, 5)
    dst = np.zeros((4, 3, 4), dtype)
    gather_rows(dst, src, rows)
    np.testing.assert_array_equal(dst, src[[4, 0, 4, 5]])


def test_gather_rows_one_d_and_strided_sources():
    src = np.arange(10, dtype=np.float64)
    dst = np.zeros(3)
    gather_rows(dst, src, rows_of(9, 0, 3))
    np.testing.assert_array_equal(dst, [9, 0, 3])
    src2 = sample((8, 5), np.float32)
    dst2 = np.zeros((3, 5), np.float32)
    gather_rows(dst2, src2[::2], rows_of(3, 1, 0))  # rows 6, 2, 0 of src2
    np.testing.assert_array_equal(dst2, src2[[6, 2, 0]])
    gather_rows(dst2, src2[::-1], rows_of(0, 7, 2))  # negative row stride
    np.testing.assert_array_equal(dst2, src2[[7, 0, 5]])


def test_gather_rows_from_ring_like_region():
    ring = sample((2, 5, 3, 4, 4), np.uint8)  # [depth][num_envs][leaf]
    dst = np.zeros((3, 3, 4, 4), np.uint8)
    gather_rows(dst, ring[1], rows_of(4, 1, 2))
    np.testing.assert_array_equal(dst, ring[1, [4, 1, 2]])


def test_gather_no_rows():
    dst = np.zeros((0, 3))
    gather_rows(dst, np.ones((4, 3)), rows_of())


@pytest.mark.parametrize("rows", [(0, 5), (5,), (-1,), (0, 1, 2, 3, 100)])
def test_gather_rows_out_of_range_is_an_index_error(rows):
    src = np.ones((5, 2))
    dst = np.zeros((len(rows), 2))
    with pytest.raises(IndexError):
        gather_rows(dst, src, rows_of(*rows))
    assert not dst.any(), "nothing is copied when any row is out of range"


def test_gather_rows_errors():
    src = np.ones((5, 3))
    with pytest.raises(ValueError):  # wrong number of dst rows
        gather_rows(np.zeros((3, 3)), src, rows_of(0, 1))
    with pytest.raises(ValueError):  # row shapes differ
        gather_rows(np.zeros((2, 4)), src, rows_of(0, 1))
    with pytest.raises(ValueError):  # ndim differs
        gather_rows(np.zeros((2, 3, 1)), src, rows_of(0, 1))
    with pytest.raises(TypeError):  # formats differ
        gather_rows(np.zeros((2, 3), np.float32), src, rows_of(0, 1))
    with pytest.raises(ValueError):  # non-contiguous destination
        gather_rows(np.zeros((2, 6))[:, ::2], src, rows_of(0, 1))
    with pytest.raises(ValueError):  # non-contiguous source rows
        gather_rows(np.zeros((2, 3)), np.ones((5, 6))[:, ::2], rows_of(0, 1))
    with pytest.raises(ValueError):  # rows must be int64
        gather_rows(np.zeros((2, 3)), src, np.array([0, 1], np.int32))
    with pytest.raises(ValueError):  # a 0-d source has no rows
        gather_rows(np.zeros(()), np.zeros(()), rows_of())


# -- properties against numpy ----------------------------------------------------------------


@st.composite
def strided_view(draw, shape, dtype):
    """A base array and a function that cuts from it a view of ``shape``, with steps
    (possibly negative) and a permuted axis order."""
    ndim = len(shape)
    perm = draw(st.permutations(range(ndim)))
    steps = draw(st.lists(st.sampled_from([1, 2, -1, -2, 3]), min_size=ndim, max_size=ndim))
    perm_shape = [shape[p] for p in perm]
    extra = draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim))
    base_shape = tuple(n * abs(s) + e for n, s, e in zip(perm_shape, steps, extra))
    base = sample(base_shape, dtype, draw(st.integers(0, 2**16)))

    def cut(arr):
        v = arr[(*(slice(None, None, s) for s in steps), Ellipsis)]
        v = v[(*(slice(0, n) for n in perm_shape), Ellipsis)]
        return v.transpose(np.argsort(perm)) if ndim else v

    assert cut(base).shape == tuple(shape)
    return base, cut


@st.composite
def strided_pair(draw):
    dtype = draw(st.sampled_from(DTYPES))
    ndim = draw(st.integers(0, 5))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim)))
    src_base, src_cut = draw(strided_view(shape, dtype))
    dst_base, dst_cut = draw(strided_view(shape, dtype))
    return src_cut(src_base), dst_base, dst_cut


@settings(database=None, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(strided_pair())
def test_copy_into_matches_numpy(pair):
    src, dst_base, cut = pair
    expect = dst_base.copy()
    cut(expect)[...] = src  # numpy's answer, on a copy of the destination's base
    copy_into(cut(dst_base), src)
    # the view holds the source and nothing outside it changed
    np.testing.assert_array_equal(dst_base, expect)


@settings(database=None, max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    nsrc=st.integers(1, 8),
    row_shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    step=st.sampled_from([1, 2, -1, -3]),
    data=st.data(),
)
def test_gather_rows_matches_numpy(dtype, nsrc, row_shape, step, data):
    base = sample((nsrc * abs(step), *row_shape), dtype, seed=nsrc)
    src = base[::step][:nsrc]
    rows = np.array(data.draw(st.lists(st.integers(0, nsrc - 1), max_size=10)), np.int64)
    dst = np.zeros((len(rows), *row_shape), dtype)
    gather_rows(dst, src, rows)
    np.testing.assert_array_equal(dst, src[rows])
