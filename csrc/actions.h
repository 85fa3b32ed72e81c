/*
 * fastvec action kernels: the parent's check of a batch of actions against the bounds of
 * their space, in one pass. Plain C, no allocation, safe without the GIL.
 *
 * A batch is `n` envs x `width` values, C order; lo[j] and hi[j] bound value j of every
 * env (Box: low/high; Discrete and MultiDiscrete: start and start + n - 1; MultiBinary:
 * 0 and 1). A value is inside when lo[j] <= v <= hi[j]: NaN is outside, as in gymnasium.
 */
#ifndef FASTVEC_ACTIONS_H
#define FASTVEC_ACTIONS_H

#include <stdint.h>

/* The element types a kernel exists for (numpy's fixed-size integers and floats). */
typedef enum {
    FV_I8, FV_I16, FV_I32, FV_I64, FV_U8, FV_U16, FV_U32, FV_U64, FV_F32, FV_F64,
    FV_NTYPES
} fv_elem;

/* Index of the first env with a value outside its bounds, or -1 when all are inside.
   values, lo and hi are arrays of `type`; an unknown type returns -2. */
int64_t fv_first_out_of_bounds(fv_elem type, const void *values, int64_t n, int64_t width,
                               const void *lo, const void *hi);

#endif
