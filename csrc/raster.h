/*
 * fastvec raster kernels: strided copies of observation rasters into ring slots and
 * gathers of slot rows into contiguous batches. Plain C, no allocation, safe without the GIL.
 *
 * Arrays are described the way the buffer protocol does it: a base pointer, ndim,
 * shape[] and byte strides[] (any sign), plus the item size in bytes. Trailing
 * dimensions that are contiguous in both source and destination are merged and moved
 * with one memcpy per run.
 */
#ifndef FASTVEC_RASTER_H
#define FASTVEC_RASTER_H

#include <stdint.h>

#define FV_RASTER_MAX_NDIM 32

enum {
    FV_RASTER_OK = 0,
    FV_RASTER_BAD_NDIM = -1,
    FV_RASTER_BAD_ARG = -2,
};

/* dst[idx] = src[idx] for every idx of shape; both arrays have the same shape and item size. */
int fv_copy_strided(char *dst, const int64_t *dst_strides, const char *src,
                    const int64_t *src_strides, const int64_t *shape, int ndim, int64_t itemsize);

/* dst row i (contiguous, row_bytes each) = src row rows[i], src rows src_stride bytes apart. */
int fv_gather_rows(char *dst, const char *src, int64_t row_bytes, int64_t src_stride,
                   const int64_t *rows, int64_t nrows, int64_t nsrc_rows);

#endif
