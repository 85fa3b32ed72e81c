"""Thin wrapper of csrc/fireobs.h: the wildfire observation raster, built without the GIL.

Inputs go through typed memoryviews (the buffer protocol, not the numpy C-API), so one
build serves numpy 1.26 and 2.x. Shapes and strides are checked with the GIL held.
"""
from libc.stdint cimport uint8_t

CHANNELS = FIREOBS_CHANNELS
FUEL, BURNED, FRONT, ARRIVAL = FIREOBS_FUEL, FIREOBS_BURNED, FIREOBS_FRONT, FIREOBS_ARRIVAL
ELEVATION, WIND_U, WIND_V = FIREOBS_ELEVATION, FIREOBS_WIND_U, FIREOBS_WIND_V
#: Channels whose float32 range is [-1, 1]; the others are [0, 1].
SIGNED_CHANNELS = (FIREOBS_WIND_U, FIREOBS_WIND_V)


cdef int _raster(fireobs_raster *r, const float[:, :] m, str name, int rows, int cols) except -1:
    # Rows may be strided (views into padded arrays); elements within a row may not.
    if m.shape[0] < rows or m.shape[1] < cols:
        raise ValueError(f"build: {name} is {m.shape[0]}x{m.shape[1]}, "
                         f"smaller than the {rows}x{cols} output")
    if m.strides[1] != sizeof(float) or m.strides[0] % sizeof(float) or m.strides[0] < 0:
        raise ValueError(f"build: {name} rows must be contiguous float32 with a positive stride")
    r.data = &m[0, 0]
    r.row_stride = m.strides[0] // sizeof(float)
    return 0


def build(out, const float[:, :] phi, const float[:, :] arrival, const float[:, :] fuel,
          const float[:, :] elevation, float arrival_scale, float wind_u, float wind_v):
    """Fill ``out`` (C-contiguous float32 or uint8, shape (CHANNELS, rows, cols)).

    The inputs are float32 rasters at least rows x cols; only their top-left rows x cols
    cells are read. See csrc/fireobs.h for the channels.
    """
    cdef float[:, :, ::1] out_f
    cdef uint8_t[:, :, ::1] out_u
    cdef fireobs_input inp
    cdef int rc
    cdef bint is_f32
    fmt = memoryview(out).format
    is_f32 = fmt == "f"
    if is_f32:
        out_f = out
        shape = (out_f.shape[0], out_f.shape[1], out_f.shape[2])
    elif fmt == "B":
        out_u = out
        shape = (out_u.shape[0], out_u.shape[1], out_u.shape[2])
    else:
        raise TypeError(f"build: out must be float32 or uint8, not format {fmt!r}")
    if shape[0] != FIREOBS_CHANNELS or shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"build: out must have shape ({FIREOBS_CHANNELS}, rows, cols), "
                         f"not {shape}")
    inp.rows, inp.cols = shape[1], shape[2]
    _raster(&inp.phi, phi, "phi", inp.rows, inp.cols)
    _raster(&inp.arrival, arrival, "arrival", inp.rows, inp.cols)
    _raster(&inp.fuel, fuel, "fuel", inp.rows, inp.cols)
    _raster(&inp.elevation, elevation, "elevation", inp.rows, inp.cols)
    inp.arrival_scale, inp.wind_u, inp.wind_v = arrival_scale, wind_u, wind_v
    with nogil:
        if is_f32:
            rc = fireobs_build_f32(&inp, &out_f[0, 0, 0])
        else:
            rc = fireobs_build_u8(&inp, &out_u[0, 0, 0])
    if rc != FIREOBS_OK:
        raise ValueError("build: bad arguments to fireobs")  # unreachable after the checks
