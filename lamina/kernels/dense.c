/* Dense linear layers for a few rows (decode steps): y[M, N] = x[M, K] . W[N, K]^T + bias, with x, y and
 * the bias float32 and W float32, fp16 or bfloat16 (16-bit weights widened to float32 as they load),
 * or float8 e4m3 with a float32 scale per block of rows and columns (FP8 checkpoints: each byte widened
 * exactly through fp16, `vf_from_e4m3`; each block's sum times its scale).
 *
 * A mat-vec reads each weight once and does one multiply-add with it, so it runs at memory speed
 * only if the loads stream; torch's float32 path measured ~11 GB/s here against ~30 GB/s for a
 * plain sum over memory. Each thread takes groups of 8 weight rows, keeps them in L1 while every
 * activation row passes over them, and reduces 8 accumulators at a time. Every output is computed
 * in the same order whatever M and the thread count, so rows are bit-identical alone or together, and
 * a 16-bit weight gives exactly what its float32 widening does.
 */
#include <stdint.h>

#include "simd.h"

#define GROUP 8      /* weight rows per pass: 8 load streams keep the memory system busy */
#define PREFETCH 512 /* weights ahead of the loads: +5-10% on a 2-core EPYC (28 vs 25-27 GB/s) */

enum { F32 = 0, F16 = 1, BF16 = 2 }; /* weight kinds */

static inline vf load_tail(const float *p, int64_t left) {
    return left >= 16 ? vf_load(p) : vf_load_first(p, (int)left);
}

/* Weights i..i+15 of a row (16-bit kinds: K is a multiple of 16). */
static inline __attribute__((always_inline)) vf load_weights(const void *row, int64_t i, int64_t left, int kind) {
    if (kind == F16) return vf_from_half((const uint16_t *)row + i);
    if (kind == BF16) return vf_from_bf16((const uint16_t *)row + i);
    return load_tail((const float *)row + i, left);
}

/* Rows n..n+rows_w-1 of W (rows_w <= GROUP) against activation row x: out[0..rows_w-1]. */
static inline __attribute__((always_inline)) void dot_rows(const float *x, const char *w, int64_t k, int rows_w,
                                                           float *out, int kind) {
    const int64_t row_bytes = k * (kind == F32 ? 4 : 2);
    vf acc[GROUP];
    for (int j = 0; j < GROUP; j++) acc[j] = vf_zero();
    for (int64_t i = 0; i < k; i += 16) {
        const vf xv = load_tail(x + i, k - i);
        for (int j = 0; j < rows_w; j++) {
            const char *row = w + j * row_bytes;
            _mm_prefetch(row + (i + PREFETCH) * (kind == F32 ? 4 : 2), _MM_HINT_T0);
            acc[j] = vf_fmadd(load_weights(row, i, k - i, kind), xv, acc[j]);
        }
    }
    for (int j = 0; j < rows_w; j++) out[j] = vf_sum(acc[j]);
}

static inline __attribute__((always_inline)) void dense_linear(const float *x, int64_t m_rows, int64_t k,
                                                               const char *w, int64_t n, const float *bias,
                                                               float *y, int64_t ldy, int kind) {
    const int64_t groups = (n + GROUP - 1) / GROUP, row_bytes = k * (kind == F32 ? 4 : 2);
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * GROUP;
        const int rows_w = n - first < GROUP ? (int)(n - first) : GROUP;
        for (int64_t r = 0; r < m_rows; r++) {
            float out[GROUP];
            if (rows_w == GROUP) dot_rows(x + r * k, w + first * row_bytes, k, GROUP, out, kind);
            else dot_rows(x + r * k, w + first * row_bytes, k, rows_w, out, kind);
            for (int j = 0; j < rows_w; j++) y[r * ldy + first + j] = bias ? out[j] + bias[first + j] : out[j];
        }
    }
}

/* y (row stride ldy) = x . W^T + bias; `kind` 0: W float32, 1: fp16, 2: bfloat16 (then K % 16 == 0). */
void lamina_dense_linear(const float *x, int64_t m_rows, int64_t k, const void *w, int64_t n, const float *bias,
                         float *y, int64_t ldy, int kind) {
    if (kind == F16) dense_linear(x, m_rows, k, w, n, bias, y, ldy, F16);
    else if (kind == BF16) dense_linear(x, m_rows, k, w, n, bias, y, ldy, BF16);
    else dense_linear(x, m_rows, k, w, n, bias, y, ldy, F32);
}

/* Rows of an e4m3 weight (rows_w <= GROUP) against activation row x: out[j] = sum over the column
 * blocks b of scale(row j, b) * (row j's values in b . x), `row_scales[j]` row j's scales. */
static inline __attribute__((always_inline)) void dot_rows_e4m3(const float *x, const uint8_t *w, int64_t k,
                                                                int rows_w, const float *const *row_scales,
                                                                int64_t scale_cols, float *out) {
    vf acc[GROUP], part[GROUP];
    for (int j = 0; j < GROUP; j++) acc[j] = vf_zero();
    for (int64_t start = 0, b = 0; start < k; start += scale_cols, b++) {
        const int64_t end = start + scale_cols < k ? start + scale_cols : k;
        for (int j = 0; j < GROUP; j++) part[j] = vf_zero();
        for (int64_t i = start; i < end; i += 16) {
            const vf xv = vf_load(x + i);
            for (int j = 0; j < rows_w; j++) {
                _mm_prefetch((const char *)(w + j * k + i + PREFETCH), _MM_HINT_T0);
                part[j] = vf_fmadd(vf_from_e4m3(w + j * k + i), xv, part[j]);
            }
        }
        /* vf_from_e4m3 gives the values times 2^-8: the scale takes the 256 back (exactly) */
        for (int j = 0; j < rows_w; j++) acc[j] = vf_fmadd(part[j], vf_set1(row_scales[j][b] * 256.0f), acc[j]);
    }
    for (int j = 0; j < rows_w; j++) out[j] = vf_sum(acc[j]);
}

/* y (row stride ldy) = x . W^T + bias for W float8 e4m3 [N, K] (K % 16 == 0) whose weight (n, k) is
 * scaled by scales[n / scale_rows][k / scale_cols] (float32 [ceil(N / scale_rows), ceil(K / scale_cols)],
 * scale_cols % 16 == 0): a scale per output row (scale_rows 1, scale_cols K), per tensor, or per block. */
void lamina_e4m3_linear(const float *x, int64_t m_rows, int64_t k, const uint8_t *w, int64_t n, const float *scales,
                        int64_t scale_rows, int64_t scale_cols, const float *bias, float *y, int64_t ldy) {
    const int64_t groups = (n + GROUP - 1) / GROUP, blocks = (k + scale_cols - 1) / scale_cols;
#pragma omp parallel for schedule(static) if (n * k > 65536)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t first = g * GROUP;
        const int rows_w = n - first < GROUP ? (int)(n - first) : GROUP;
        const float *row_scales[GROUP];
        for (int j = 0; j < rows_w; j++) row_scales[j] = scales + ((first + j) / scale_rows) * blocks;
        for (int64_t r = 0; r < m_rows; r++) {
            float out[GROUP];
            if (rows_w == GROUP) dot_rows_e4m3(x + r * k, w + first * k, k, GROUP, row_scales, scale_cols, out);
            else dot_rows_e4m3(x + r * k, w + first * k, k, rows_w, row_scales, scale_cols, out);
            for (int j = 0; j < rows_w; j++) y[r * ldy + first + j] = bias ? out[j] + bias[first + j] : out[j];
        }
    }
}
