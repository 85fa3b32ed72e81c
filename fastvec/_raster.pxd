# Mirror of csrc/raster.h, one to one.
from libc.stdint cimport int64_t

cdef extern from "raster.h" nogil:
    enum:
        FV_RASTER_MAX_NDIM
        FV_RASTER_OK
        FV_RASTER_BAD_NDIM
        FV_RASTER_BAD_ARG

    int fv_copy_strided(char *dst, const int64_t *dst_strides, const char *src,
                        const int64_t *src_strides, const int64_t *shape, int ndim,
                        int64_t itemsize) noexcept
    int fv_gather_rows(char *dst, const char *src, int64_t row_bytes, int64_t src_stride,
                       const int64_t *rows, int64_t nrows, int64_t nsrc_rows) noexcept
