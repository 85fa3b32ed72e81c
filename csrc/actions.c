/* fastvec action kernels. See actions.h. */
#include "actions.h"

#define FIRST_OUT(T)                                                                   \
    static int64_t first_out_##T(const T *v, int64_t n, int64_t width, const T *lo,     \
                                 const T *hi) {                                         \
        for (int64_t i = 0; i < n; i++, v += width)                                     \
            for (int64_t j = 0; j < width; j++)                                         \
                if (!(v[j] >= lo[j] && v[j] <= hi[j])) return i;                        \
        return -1;                                                                      \
    }

FIRST_OUT(int8_t)
FIRST_OUT(int16_t)
FIRST_OUT(int32_t)
FIRST_OUT(int64_t)
FIRST_OUT(uint8_t)
FIRST_OUT(uint16_t)
FIRST_OUT(uint32_t)
FIRST_OUT(uint64_t)
FIRST_OUT(float)
FIRST_OUT(double)

int64_t fv_first_out_of_bounds(fv_elem type, const void *values, int64_t n, int64_t width,
                               const void *lo, const void *hi) {
    switch (type) {
    case FV_I8: return first_out_int8_t(values, n, width, lo, hi);
    case FV_I16: return first_out_int16_t(values, n, width, lo, hi);
    case FV_I32: return first_out_int32_t(values, n, width, lo, hi);
    case FV_I64: return first_out_int64_t(values, n, width, lo, hi);
    case FV_U8: return first_out_uint8_t(values, n, width, lo, hi);
    case FV_U16: return first_out_uint16_t(values, n, width, lo, hi);
    case FV_U32: return first_out_uint32_t(values, n, width, lo, hi);
    case FV_U64: return first_out_uint64_t(values, n, width, lo, hi);
    case FV_F32: return first_out_float(values, n, width, lo, hi);
    case FV_F64: return first_out_double(values, n, width, lo, hi);
    default: return -2;
    }
}
