/* GroupNorm forward and backward for channels-last (NHWC) maps, float32 or bfloat16 (issue 14).

   PyTorch's CPU GroupNorm is fast on NCHW maps and several times slower on channels-last ones (its
   backward above all), which is what kept the nets off the channels-last layout that lets oneDNN skip
   its layout reorders. These loops read the NHWC memory in order: x is [N][HW][C], groups are runs of
   C / G consecutive channels, statistics are per (n, group) over HW * C / G values. float32
   statistics with double sums per chunk; bfloat16 values are widened exactly and rounded back to
   nearest even, as PyTorch rounds. gamma and beta are float32 [C]; mean and rstd float32 [N * G].
   dgamma and dbeta are accumulated (the caller zeroes them). */

/* -O3 for this file (the shared flags say -O2): it vectorises the per-channel loops. */
#pragma GCC optimize("O3")
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_CHANNELS 4096
#define CHUNK 64 /* pixels summed in float before the double accumulators */
/* Built for the baseline x86-64 and dispatched at load time where AVX2 or AVX-512 is present. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline uint16_t f32_to_bf16(float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u); /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* Per-channel sums over one image's HW pixels: s1[c] = sum x, s2[c] = sum x * y (y = x when y == 0). */
#define CHANNEL_SUMS(NAME, T, LOAD)                                                                  \
    VECTOR_CLONES static void NAME(const T *x, const T *y, int64_t hw, int64_t channels, double *s1, double *s2) { \
        float a[MAX_CHANNELS], b[MAX_CHANNELS];                                                      \
        for (int64_t c = 0; c < channels; c++) s1[c] = s2[c] = 0.0;                                  \
        for (int64_t start = 0; start < hw; start += CHUNK) {                                        \
            int64_t stop = start + CHUNK < hw ? start + CHUNK : hw;                                  \
            for (int64_t c = 0; c < channels; c++) a[c] = b[c] = 0.0f;                               \
            for (int64_t p = start; p < stop; p++) {                                                 \
                const T *xp = x + p * channels;                                                      \
                const T *yp = (y ? y : x) + p * channels;                                            \
                for (int64_t c = 0; c < channels; c++) {                                             \
                    float u = LOAD(xp[c]), v = LOAD(yp[c]);                                          \
                    a[c] += u;                                                                       \
                    b[c] += u * v;                                                                   \
                }                                                                                    \
            }                                                                                        \
            for (int64_t c = 0; c < channels; c++) {                                                 \
                s1[c] += a[c];                                                                       \
                s2[c] += b[c];                                                                       \
            }                                                                                        \
        }                                                                                            \
    }

#define LOAD_F32(v) (v)
#define STORE_F32(v) (v)
CHANNEL_SUMS(sums_f32, float, LOAD_F32)
CHANNEL_SUMS(sums_bf16, uint16_t, bf16_to_f32)

/* y = x * scale[c] + shift[c], scale = rstd * gamma, shift = beta - mean * scale. */
#define FORWARD(NAME, SUMS, T, LOAD, STORE)                                                                \
    VECTOR_CLONES int64_t NAME(const T *x, T *y, const float *gamma, const float *beta, int64_t n_images, int64_t hw,   \
                 int64_t channels, int64_t groups, float eps, float *mean, float *rstd) {                 \
        if (channels > MAX_CHANNELS || groups <= 0 || channels % groups) return -1;                        \
        int64_t per_group = channels / groups;                                                             \
        double s1[MAX_CHANNELS], s2[MAX_CHANNELS];                                                         \
        float scale[MAX_CHANNELS], shift[MAX_CHANNELS];                                                    \
        for (int64_t n = 0; n < n_images; n++) {                                                           \
            const T *xn = x + n * hw * channels;                                                           \
            T *yn = y + n * hw * channels;                                                                 \
            SUMS(xn, 0, hw, channels, s1, s2);                                                             \
            for (int64_t g = 0; g < groups; g++) {                                                         \
                double sum = 0.0, square = 0.0, count = (double)hw * per_group;                            \
                for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {                            \
                    sum += s1[c];                                                                          \
                    square += s2[c];                                                                       \
                }                                                                                          \
                double m = sum / count, var = square / count - m * m;                                      \
                float r = (float)(1.0 / sqrt((var > 0.0 ? var : 0.0) + eps));                              \
                mean[n * groups + g] = (float)m;                                                           \
                rstd[n * groups + g] = r;                                                                  \
                for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {                            \
                    scale[c] = r * gamma[c];                                                               \
                    shift[c] = beta[c] - (float)m * scale[c];                                              \
                }                                                                                          \
            }                                                                                              \
            for (int64_t p = 0; p < hw; p++) {                                                             \
                const T *xp = xn + p * channels;                                                           \
                T *yp = yn + p * channels;                                                                 \
                for (int64_t c = 0; c < channels; c++) yp[c] = STORE(LOAD(xp[c]) * scale[c] + shift[c]);   \
            }                                                                                              \
        }                                                                                                  \
        return 0;                                                                                          \
    }

FORWARD(unsup3d_group_norm_nhwc_forward_f32, sums_f32, float, LOAD_F32, STORE_F32)
FORWARD(unsup3d_group_norm_nhwc_forward_bf16, sums_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* With xhat = (x - mean) rstd, M = HW * C / G and per group A = sum gamma dy, B = sum gamma dy xhat:
   dx = rstd (gamma dy - A / M - xhat B / M) = (rstd gamma[c]) dy + k1 x + k0 with
   k1 = -rstd^2 B / M and k0 = -k1 mean - rstd A / M; dgamma[c] += sum dy xhat, dbeta[c] += sum dy. */
#define BACKWARD(NAME, SUMS, T, LOAD, STORE)                                                                 \
    VECTOR_CLONES int64_t NAME(const T *dy, const T *x, const float *mean, const float *rstd, const float *gamma,         \
                 int64_t n_images, int64_t hw, int64_t channels, int64_t groups, T *dx, float *dgamma,      \
                 float *dbeta) {                                                                            \
        if (channels > MAX_CHANNELS || groups <= 0 || channels % groups) return -1;                          \
        int64_t per_group = channels / groups;                                                               \
        double sum_dy[MAX_CHANNELS], sum_dy_x[MAX_CHANNELS];                                                 \
        float coef[MAX_CHANNELS], k1[MAX_CHANNELS], k0[MAX_CHANNELS];                                        \
        for (int64_t n = 0; n < n_images; n++) {                                                             \
            const T *dyn = dy + n * hw * channels, *xn = x + n * hw * channels;                              \
            T *dxn = dx + n * hw * channels;                                                                 \
            SUMS(dyn, xn, hw, channels, sum_dy, sum_dy_x);                                                   \
            for (int64_t g = 0; g < groups; g++) {                                                           \
                double m = mean[n * groups + g], r = rstd[n * groups + g], count = (double)hw * per_group;  \
                double a = 0.0, b = 0.0;                                                                     \
                for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {                              \
                    double dy_xhat = (sum_dy_x[c] - m * sum_dy[c]) * r;                                      \
                    dgamma[c] += (float)dy_xhat;                                                             \
                    dbeta[c] += (float)sum_dy[c];                                                            \
                    a += gamma[c] * sum_dy[c];                                                               \
                    b += gamma[c] * dy_xhat;                                                                 \
                }                                                                                            \
                double slope = -r * r * b / count;                                                           \
                double offset = -slope * m - r * a / count;                                                  \
                for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {                              \
                    coef[c] = (float)(r * gamma[c]);                                                         \
                    k1[c] = (float)slope;                                                                    \
                    k0[c] = (float)offset;                                                                   \
                }                                                                                            \
            }                                                                                                \
            for (int64_t p = 0; p < hw; p++) {                                                               \
                const T *dyp = dyn + p * channels, *xp = xn + p * channels;                                  \
                T *dxp = dxn + p * channels;                                                                 \
                for (int64_t c = 0; c < channels; c++)                                                       \
                    dxp[c] = STORE(coef[c] * LOAD(dyp[c]) + k1[c] * LOAD(xp[c]) + k0[c]);                   \
            }                                                                                                \
        }                                                                                                    \
        return 0;                                                                                            \
    }

BACKWARD(unsup3d_group_norm_nhwc_backward_f32, sums_f32, float, LOAD_F32, STORE_F32)
BACKWARD(unsup3d_group_norm_nhwc_backward_bf16, sums_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
