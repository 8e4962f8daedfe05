/* LLM.int8() (Dettmers et al. 2022) on the block kernel, in one call: what `quant/llm_int8.py` does in
 * ~20 dispatched torch ops, which cost more than the product itself for a decode step.
 *
 *   y[M, N] = round(x_in / s) * s . W^T + x[:, outliers] . W[:, outliers]^T
 *
 * The columns of x (input features) where any row has |x| >= threshold are the outliers: they are
 * multiplied in float against their weight columns (int8 code times the row's float32 scale). Every
 * other column goes through int8: each row is quantized to absmax / 127 (s, per row, outliers left
 * out) and the int8 values times s go through blockq.c's int8 matmul (the weight as 8-bit tiles with
 * code q + 128 and the row scale as each block's fp16 d), whose own block-wise requantization holds
 * them to 2^-15 of each block's range. The non-outlier part is computed exactly as the torch ops
 * compute it (same divisions, round half to even); the outlier sums differ from a BLAS matmul's only
 * in summation order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define BLOCK 32
#define TILE 16

int lamina_blockq_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const uint16_t *d,
                         const uint16_t *m, int64_t n, int bits, int offset, const uint8_t *lut, int scale_block,
                         float *y, int64_t ldy);

/* The int8 code of weight (row, column) in the 8-bit tiles: [N/16][K/32][8 j][16 row][4 kk] bytes = q + 128. */
static inline int8_t tiled_code(const uint8_t *codes, int64_t k, int64_t row, int64_t column) {
    const int64_t at = ((row / TILE * (k / BLOCK) + column / BLOCK) * 8 + column % BLOCK / 4) * (TILE * 4) +
                       row % TILE * 4 + column % 4;
    return (int8_t)(codes[at] ^ 0x80);
}

/* x [M, K] float32; codes / d as `lamina_blockq_matmul` takes 8-bit tiles (offset 128); scales [N] the
 * float32 row scales; y [M, N] with row stride ldy. Returns 0, -1 without scratch memory, or the block
 * kernel's status. */
int lamina_llm_int8_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const uint16_t *d,
                           const float *scales, int64_t n, float threshold, float *y, int64_t ldy) {
    float *xq = malloc(m_rows * k * sizeof(float));
    int64_t *outliers = malloc(k * sizeof(int64_t));
    if (!xq || !outliers) {
        free(xq), free(outliers);
        return -1;
    }
    int64_t count = 0;
    for (int64_t c = 0; c < k; c++) {
        int outlier = 0;
        for (int64_t r = 0; r < m_rows && !outlier; r++) outlier = fabsf(x[r * k + c]) >= threshold;
        if (outlier) outliers[count++] = c;
    }
    for (int64_t r = 0; r < m_rows; r++) {
        const float *xr = x + r * k;
        float *qr = xq + r * k;
        float amax = 0.0f;
        for (int64_t c = 0; c < k; c++) qr[c] = xr[c];
        for (int64_t j = 0; j < count; j++) qr[outliers[j]] = 0.0f;
        for (int64_t c = 0; c < k; c++) amax = fmaxf(amax, fabsf(qr[c]));
        const float s = fmaxf(amax, 1e-12f) / 127.0f;
        for (int64_t c = 0; c < k; c++) qr[c] = nearbyintf(qr[c] / s) * s;
    }
    int status = lamina_blockq_matmul(xq, m_rows, k, codes, d, NULL, n, 8, 128, NULL, BLOCK, y, ldy);
    if (status == 0 && count > 0) {
#pragma omp parallel for schedule(static)
        for (int64_t row = 0; row < n; row++) {
            for (int64_t r = 0; r < m_rows; r++) {
                float sum = 0.0f;
                for (int64_t j = 0; j < count; j++)
                    sum += x[r * k + outliers[j]] * ((float)tiled_code(codes, k, row, outliers[j]) * scales[row]);
                y[r * ldy + row] += sum;
            }
        }
    }
    free(xq), free(outliers);
    return status;
}
