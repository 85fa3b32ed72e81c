/* fastvec raster kernels. See raster.h. */
#include "raster.h"

#include <string.h>

/* Merge trailing dims that are contiguous in both arrays; returns the new ndim and
   the byte length of one contiguous run in *run. */
static int coalesce(int64_t *shape, int64_t *ds, int64_t *ss, int ndim, int64_t itemsize,
                    int64_t *run) {
    int64_t bytes = itemsize;
    while (ndim > 0 && ds[ndim - 1] == bytes && ss[ndim - 1] == bytes) {
        bytes *= shape[ndim - 1];
        ndim--;
    }
    *run = bytes;
    return ndim;
}

int fv_copy_strided(char *dst, const int64_t *dst_strides, const char *src,
                    const int64_t *src_strides, const int64_t *shape, int ndim, int64_t itemsize) {
    int64_t sh[FV_RASTER_MAX_NDIM], ds[FV_RASTER_MAX_NDIM], ss[FV_RASTER_MAX_NDIM];
    int64_t idx[FV_RASTER_MAX_NDIM];
    int64_t run;
    if (ndim < 0 || ndim > FV_RASTER_MAX_NDIM) return FV_RASTER_BAD_NDIM;
    if (itemsize <= 0) return FV_RASTER_BAD_ARG;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 0) return FV_RASTER_OK;
        sh[d] = shape[d];
        ds[d] = dst_strides[d];
        ss[d] = src_strides[d];
    }
    int outer = coalesce(sh, ds, ss, ndim, itemsize, &run);
    if (outer == 0) {
        memcpy(dst, src, (size_t)run);
        return FV_RASTER_OK;
    }
    /* Odometer over the outer dims; the innermost outer dim is the hot loop. */
    memset(idx, 0, sizeof(int64_t) * (size_t)outer);
    int last = outer - 1;
    for (;;) {
        char *d = dst;
        const char *s = src;
        for (int k = 0; k < last; k++) {
            d += idx[k] * ds[k];
            s += idx[k] * ss[k];
        }
        for (int64_t i = 0; i < sh[last]; i++, d += ds[last], s += ss[last])
            memcpy(d, s, (size_t)run);
        int k = last - 1;
        while (k >= 0) {
            if (++idx[k] < sh[k]) break;
            idx[k] = 0;
            k--;
        }
        if (k < 0) return FV_RASTER_OK;
    }
}

int fv_gather_rows(char *dst, const char *src, int64_t row_bytes, int64_t src_stride,
                   const int64_t *rows, int64_t nrows, int64_t nsrc_rows) {
    if (row_bytes < 0 || nrows < 0) return FV_RASTER_BAD_ARG;
    for (int64_t i = 0; i < nrows; i++)
        if (rows[i] < 0 || rows[i] >= nsrc_rows) return FV_RASTER_BAD_ARG;
    for (int64_t i = 0; i < nrows; i++)
        memcpy(dst + i * row_bytes, src + rows[i] * src_stride, (size_t)row_bytes);
    return FV_RASTER_OK;
}
