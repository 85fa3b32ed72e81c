/* Observation raster of the wildfire env; layout and channel meanings are in fireobs.h. */
#include "fireobs.h"

#define AT(r, y, x) ((r).data[(ptrdiff_t)(y) * (r).row_stride + (x)])

/* Written so that NaN compares false and lands on 0. */
static inline float clamp01(float v) { return v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f; }

static inline float clamp11(float v)
{
    if (!(v == v))
        return 0.0f;
    return v > -1.0f ? (v < 1.0f ? v : 1.0f) : -1.0f;
}

static int check(const fireobs_input *in, const void *out)
{
    const fireobs_raster *r[4];
    int k;
    if (in == NULL || out == NULL || in->rows <= 0 || in->cols <= 0)
        return FIREOBS_BAD_ARG;
    r[0] = &in->phi;
    r[1] = &in->arrival;
    r[2] = &in->fuel;
    r[3] = &in->elevation;
    for (k = 0; k < 4; k++)
        if (r[k]->data == NULL || r[k]->row_stride < in->cols)
            return FIREOBS_BAD_ARG;
    return FIREOBS_OK;
}

/* An unburned cell the fire can still enter: what makes a burned neighbour part of the front. */
static inline int open_cell(const fireobs_input *in, int y, int x)
{
    return !(AT(in->phi, y, x) < 0.0f) && AT(in->fuel, y, x) > 0.0f;
}

/* Channels 0-4 of cell (y, x); the wind planes are constant and set by the callers. */
static inline void cell_values(const fireobs_input *in, int y, int x, float v[5])
{
    const float arrival = AT(in->arrival, y, x);
    int front = 0;
    if (AT(in->phi, y, x) < 0.0f)
        front = (y > 0 && open_cell(in, y - 1, x)) || (y + 1 < in->rows && open_cell(in, y + 1, x))
             || (x > 0 && open_cell(in, y, x - 1)) || (x + 1 < in->cols && open_cell(in, y, x + 1));
    v[FIREOBS_FUEL] = clamp01(AT(in->fuel, y, x));
    v[FIREOBS_BURNED] = arrival == arrival ? 1.0f : 0.0f;  /* false only for NaN */
    v[FIREOBS_FRONT] = (float)front;
    v[FIREOBS_ARRIVAL] = clamp01(arrival * in->arrival_scale);
    v[FIREOBS_ELEVATION] = clamp01(AT(in->elevation, y, x));
}

int fireobs_build_f32(const fireobs_input *in, float *out)
{
    int rc = check(in, out), y, x, c;
    if (rc != FIREOBS_OK)
        return rc;
    const ptrdiff_t plane = (ptrdiff_t)in->rows * in->cols;
    const float u = clamp11(in->wind_u), w = clamp11(in->wind_v);
    float v[5];
    for (y = 0; y < in->rows; y++) {
        for (x = 0; x < in->cols; x++) {
            float *o = out + (ptrdiff_t)y * in->cols + x;
            cell_values(in, y, x, v);
            for (c = 0; c < 5; c++)
                o[c * plane] = v[c];
            o[FIREOBS_WIND_U * plane] = u;
            o[FIREOBS_WIND_V * plane] = w;
        }
    }
    return FIREOBS_OK;
}

/* v is already clamped, so the sums are in [0.5, 255.5] and truncation rounds half up. */
static inline uint8_t u8_01(float v) { return (uint8_t)(255.0f * v + 0.5f); }
static inline uint8_t u8_11(float v) { return (uint8_t)(127.5f * (v + 1.0f) + 0.5f); }

int fireobs_build_u8(const fireobs_input *in, uint8_t *out)
{
    int rc = check(in, out), y, x, c;
    if (rc != FIREOBS_OK)
        return rc;
    const ptrdiff_t plane = (ptrdiff_t)in->rows * in->cols;
    const uint8_t u = u8_11(clamp11(in->wind_u)), w = u8_11(clamp11(in->wind_v));
    float v[5];
    for (y = 0; y < in->rows; y++) {
        for (x = 0; x < in->cols; x++) {
            uint8_t *o = out + (ptrdiff_t)y * in->cols + x;
            cell_values(in, y, x, v);
            for (c = 0; c < 5; c++)
                o[c * plane] = u8_01(v[c]);
            o[FIREOBS_WIND_U * plane] = u;
            o[FIREOBS_WIND_V * plane] = w;
        }
    }
    return FIREOBS_OK;
}
