/*
 * fastvec fire observation kernel: builds the wildfire env's observation raster from the
 * simulator's live matrices in one pass. Plain C, no allocation, safe without the GIL.
 *
 * Output: channels-first and C-contiguous, out[FIREOBS_CHANNELS][rows][cols]. Row 0 is the
 * southernmost row (pyretechnics' y axis points north), column 0 the westernmost.
 *
 *   ch  name       float32 value                                               range
 *   0   FUEL       fuel[y][x]: fuel load, 0 = not burnable (rock, water, break)    [0, 1]
 *   1   BURNED     1 if the cell has an arrival time (not NaN), else 0             {0, 1}
 *   2   FRONT      1 if phi < 0 and a 4-neighbour inside the grid has phi >= 0     {0, 1}
 *                  and fuel > 0, else 0
 *   3   ARRIVAL    arrival * arrival_scale, 0 where arrival is NaN                  [0, 1]
 *   4   ELEVATION  elevation[y][x]                                                 [0, 1]
 *   5   WIND_U     wind_u, the eastward part of where the wind blows to            [-1, 1]
 *   6   WIND_V     wind_v, the northward part                                      [-1, 1]
 *
 * BURNED reads arrival, not phi: pyretechnics sometimes lets a burned cell's phi climb back
 * above 0 (seen next to the grid edge and around breaks), but never clears an arrival time.
 * FRONT reads phi like pyretechnics' own frontier. Every value is clamped to its range; NaN
 * inputs give 0. The uint8 variant scales [0, 1]
 * channels as round(255 * v) and [-1, 1] channels as round(127.5 * (v + 1)), so 0 -> 128.
 *
 * Inputs are float32 rasters of at least rows x cols, given by a pointer to element [0][0]
 * and the distance between the starts of two rows in elements (>= cols). The simulator's phi
 * is a view into a padded array and the grid has an extra east column, so strides differ.
 */
#ifndef FASTVEC_FIREOBS_H
#define FASTVEC_FIREOBS_H

#include <stddef.h>
#include <stdint.h>

enum {
    FIREOBS_FUEL = 0,
    FIREOBS_BURNED = 1,
    FIREOBS_FRONT = 2,
    FIREOBS_ARRIVAL = 3,
    FIREOBS_ELEVATION = 4,
    FIREOBS_WIND_U = 5,
    FIREOBS_WIND_V = 6,
    FIREOBS_CHANNELS = 7,
};

enum {
    FIREOBS_OK = 0,
    FIREOBS_BAD_ARG = -1,  /* NULL pointer, empty grid or a row stride < cols */
};

typedef struct {
    const float *data;     /* element [0][0] */
    ptrdiff_t row_stride;  /* elements from one row's start to the next */
} fireobs_raster;

typedef struct {
    int rows, cols;
    fireobs_raster phi, arrival, fuel, elevation;
    float arrival_scale;   /* 1 / the time (minutes) that maps to ARRIVAL = 1 */
    float wind_u, wind_v;  /* already divided by the wind speed that maps to 1 */
} fireobs_input;

int fireobs_build_f32(const fireobs_input *in, float *out);
int fireobs_build_u8(const fireobs_input *in, uint8_t *out);

#endif
