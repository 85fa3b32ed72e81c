# Mirror of csrc/fireobs.h, one to one.
from libc.stdint cimport uint8_t

cdef extern from "fireobs.h" nogil:
    enum:
        FIREOBS_FUEL
        FIREOBS_BURNED
        FIREOBS_FRONT
        FIREOBS_ARRIVAL
        FIREOBS_ELEVATION
        FIREOBS_WIND_U
        FIREOBS_WIND_V
        FIREOBS_CHANNELS

    enum:
        FIREOBS_OK
        FIREOBS_BAD_ARG

    ctypedef struct fireobs_raster:
        const float *data
        Py_ssize_t row_stride

    ctypedef struct fireobs_input:
        int rows, cols
        fireobs_raster phi, arrival, fuel, elevation
        float arrival_scale
        float wind_u, wind_v

    int fireobs_build_f32(const fireobs_input *inp, float *out) noexcept
    int fireobs_build_u8(const fireobs_input *inp, uint8_t *out) noexcept
