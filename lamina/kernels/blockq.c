/* Block-quantized matrix products on x86-64 CPUs (AVX-512 VNNI, or AVX2: simd.h): Lamina's decode kernel.
 *
 * y[M, N] = x[M, K] . W^T where W is stored in 32-weight blocks along K, as GGUF stores it:
 * w = d * (c - offset) + m, with unsigned codes c (3, 4, 5, 6 or 8 bits), an fp16 scale d and an
 * optional fp16 bias m per block of 32. Q4_0 is (4 bits, offset 8, no m), Q4_1 is (4 bits, offset 0,
 * m), Q8_0 is (8 bits stored as q + 128, offset 128, no m), Q5_0 / Q5_1 are Q4_0 / Q4_1 with 5 bits
 * and offset 16 / 0.
 *
 * Scales per 16 weights (Q2_K's, Q3_K's and Q6_K's sub-blocks: `scale_block` 16, no code book): each
 * 32-block has two d (and m), d[N/16][K/16][16], and each half's dot product gets its own.
 *
 * Code books (NF4/FP4): 4-bit codes index a table of 16 values instead of being values themselves.
 * `lut` holds each value v (|v| <= 1) times 127 as two unsigned bytes, a = lut[c] and b = lut[16 + c],
 * with 127 v ~= (a - offset) + (b - 64) / 128 to within 2^-8 (so w = d * (127 v) with d = absmax / 127
 * is within 3.1e-5 absmax of the code book's value); VPSHUFB maps 64 codes per instruction and b's
 * products take one more VPDPBUSD per weight vector (against the first activation pass only: b is
 * 1/128 of the value, so the second pass would change it by under 2^-15). With a scale per 16 weights
 * (the IQ grids that scale each 16) the book must be integers (b = 64 throughout): b's term is skipped.
 *
 * As llama.cpp does, x is quantized per 32-block to int8 with one float scale (dx = max|x| / 127),
 * so each block's dot product is an exact integer sum computed by VPDPBUSD (u8 x s8, 64 products
 * per instruction); y = sum over blocks of d * dx * (sum c * qx - offset * sum qx) + m * dx * sum qx.
 *
 * Layout ("tiles"): rows are grouped 16 at a time so that one VPDPBUSD yields 16 rows' partial
 * sums in 16 lanes, with no horizontal reduction:
 *   codes 4-bit: [N/16][K/32][4 p][16 row][4 kk] bytes; low nibble = k 4p + kk, high = k 16 + 4p + kk
 *   codes 8-bit: [N/16][K/32][8 j][16 row][4 kk] bytes = k 4j + kk
 *   codes 2-bit: [N/16][K/32][2 v][16 row][4 kk] bytes; bits 2s..2s+1 = k 4 (4v + s) + kk
 *   codes 3/5/6-bit (Q3_K, Q5_x, Q6_K): the 2-bit (3) or 4-bit (5, 6) tile of the low bits, then one
 *                64-byte plane per higher bit: [8 j][8 bytes], bit (4 row + kk) of the 8 bytes is
 *                that bit of k 4j + kk
 *   d, m:        [N/16][K/32][16 row] fp16 (d per 16 weights: [N/16][K/16][16 row])
 * Every output row is computed by one thread in the same order whatever M, the row grouping and
 * the thread count, so results are bit-identical between a 1-row and an M-row call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "simd.h"

#define BLOCK 32
#define TILE 16
#define ROWS_PER_PASS 4 /* activation rows sharing one unpacked weight block */
#define ROW_CHUNK 64    /* activation rows per pass over the tiles (keeps them in L2) */

/* One activation row -> per 32-block: two int8 code sets (x ~= d1 * q1 + d2 * q2, the second
 * quantizing what the first left over), their scales, their code sums per 16 ([pass][half]), and the
 * float sums of x per 16 ([half]). */
static void quantize_row(const float *x, int64_t k, int8_t *qx, float *dx, int32_t *sumq, float *sumx) {
    for (int64_t b = 0; b < k / BLOCK; b++) {
        vf part[2] = {vf_load(x + b * BLOCK), vf_load(x + b * BLOCK + 16)};
        sumx[2 * b] = vf_sum(part[0]);
        sumx[2 * b + 1] = vf_sum(part[1]);
        for (int pass = 0; pass < 2; pass++) {
            float amax = vf_max_lane(vf_max(vf_abs(part[0]), vf_abs(part[1])));
            vf scale = vf_set1(amax / 127.0f);
            vf inv = vf_set1(amax > 0.0f ? 127.0f / amax : 0.0f);
            for (int h = 0; h < 2; h++) {
                vi q = vi_round_f(vf_mul(part[h], inv)); /* round to nearest even */
                vi_store_i8(qx + b * 2 * BLOCK + pass * BLOCK + h * 16, q);
                sumq[4 * b + 2 * pass + h] = vi_sum_i32(q);
                part[h] = vf_fnmadd(vf_from_i32(q), scale, part[h]); /* what is left */
            }
            dx[2 * b + pass] = amax / 127.0f;
        }
    }
}

/* The 8 vectors of one tile's block: vector j holds 16 rows x codes of k 4j..4j+3. */
static inline __attribute__((always_inline)) void load_block(const uint8_t *codes, int bits, vi u[8]) {
    if (bits == 8) {
        for (int j = 0; j < 8; j++) u[j] = vi_load(codes + 64 * j);
        return;
    }
    const int base = bits < 4 ? 2 : 4; /* bits in the tile; the rest come from bit planes */
    if (base == 4) {
        const vi nibble = vi_set1_i8(0x0F);
        for (int p = 0; p < 4; p++) {
            vi packed = vi_load(codes + 64 * p);
            u[p] = vi_and(packed, nibble);
            u[p + 4] = vi_and(vi_srl16(packed, 4), nibble);
        }
    } else {
        const vi pair = vi_set1_i8(0x03);
        for (int v = 0; v < 2; v++) {
            vi packed = vi_load(codes + 64 * v);
            for (int sh = 0; sh < 4; sh++) u[4 * v + sh] = vi_and(vi_srl16(packed, 2 * sh), pair);
        }
    }
    for (int plane = 0; plane < bits - base; plane++) { /* the higher bits of every code, one plane each */
        const uint8_t *mask = codes + 64 * base + 64 * plane;
        const char bit = (char)((1 << base) << plane);
        for (int j = 0; j < 8; j++) {
            uint64_t m;
            memcpy(&m, mask + 8 * j, 8);
            u[j] = vi_or(u[j], vi_bytes_from_bits(m, bit));
        }
    }
}

/* `rows` activation rows (1..ROWS_PER_PASS) against one tile: y[r][0..15]. `code_max` bounds the
 * code bytes (after the code book), for the AVX2 build's dot products (simd.h). */
static inline __attribute__((always_inline)) void tile_rows(
    const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t nblocks, int bits, int offset,
    const uint8_t *lut, const int sub16, const int code_max, const int8_t *qx, const float *dx,
    const int32_t *sumq, const float *sumx, int64_t k, float *y, int64_t ldy, const int rows) {
    const int64_t block_bytes = bits * BLOCK * TILE / 8;
    vf acc[ROWS_PER_PASS];
    for (int r = 0; r < rows; r++) acc[r] = vf_zero();
    /* code book halves in every 128-bit lane, for VPSHUFB (which looks up within lanes) */
    const vi lut_a = lut ? vi_broadcast16(lut) : vi_zero();
    const vi lut_b = lut ? vi_broadcast16(lut + 16) : lut_a;
    for (int64_t b = 0; b < nblocks; b++) {
        vi u[8], ub[8];
        load_block(codes + b * block_bytes, bits, u);
        if (lut)
            for (int j = 0; j < 8; j++) {
                ub[j] = vi_lookup(lut_b, u[j]);
                u[j] = vi_lookup(lut_a, u[j]);
            }
        if (sub16) {
            const vf da = vf_from_half(d + 2 * b * TILE), db = vf_from_half(d + (2 * b + 1) * TILE);
            const vf ma = m ? vf_from_half(m + 2 * b * TILE) : da;
            const vf mb = m ? vf_from_half(m + (2 * b + 1) * TILE) : db;
            for (int r = 0; r < rows; r++) {
                const int32_t *q = (const int32_t *)(qx + r * 2 * k + b * 2 * BLOCK);
                const int32_t *s = sumq + r * 4 * (k / BLOCK) + 4 * b;
                const float *xs = dx + r * 2 * (k / BLOCK) + 2 * b;
                vi dot[4]; /* [pass][half] */
                for (int i = 0; i < 4; i++) /* vectors 4 (i % 2) .. +3 against pass i / 2's codes */
                    dot[i] = vi_dot4_sum(vi_set1_i32(-offset * s[i]), u + 4 * (i % 2), q + 4 * i, 4, code_max);
                for (int i = 0; i < 4; i++)
                    acc[r] = vf_fmadd(vf_from_i32(dot[i]), vf_mul(i % 2 ? db : da, vf_set1(xs[i / 2])), acc[r]);
                if (m) {
                    const float *sx = sumx + r * 2 * (k / BLOCK) + 2 * b;
                    acc[r] = vf_fmadd(ma, vf_set1(sx[0]), acc[r]);
                    acc[r] = vf_fmadd(mb, vf_set1(sx[1]), acc[r]);
                }
            }
            continue;
        }
        const vf dv = vf_from_half(d + b * TILE);
        const vf mv = m ? vf_from_half(m + b * TILE) : dv;
        for (int r = 0; r < rows; r++) {
            const int32_t *q = (const int32_t *)(qx + r * 2 * k + b * 2 * BLOCK); /* 4 codes per lane */
            const int32_t *sh = sumq + r * 4 * (k / BLOCK) + 4 * b;
            const int32_t s[2] = {sh[0] + sh[1], sh[2] + sh[3]}; /* per pass */
            const float *xs = dx + r * 2 * (k / BLOCK) + 2 * b;
            const vi dot1 = vi_dot4_sum(vi_set1_i32(-offset * s[0]), u, q, 8, code_max);
            const vi dot2 = vi_dot4_sum(vi_set1_i32(-offset * s[1]), u, q + 8, 8, code_max);
            acc[r] = vf_fmadd(vf_from_i32(dot1), vf_mul(dv, vf_set1(xs[0])), acc[r]);
            acc[r] = vf_fmadd(vf_from_i32(dot2), vf_mul(dv, vf_set1(xs[1])), acc[r]);
            if (lut) {
                const vi dot3 = vi_dot4_sum(vi_set1_i32(-64 * s[0]), ub, q, 8, 128); /* b <= 128 */
                acc[r] = vf_fmadd(vf_from_i32(dot3), vf_mul(dv, vf_set1(xs[0] / 128.0f)), acc[r]);
            }
            if (m) {
                const float *sx = sumx + r * 2 * (k / BLOCK) + 2 * b;
                acc[r] = vf_fmadd(mv, vf_set1(sx[0] + sx[1]), acc[r]);
            }
        }
    }
    for (int r = 0; r < rows; r++) vf_store(y + r * ldy, acc[r]);
}

/* `tile_rows` with `rows` (1..ROWS_PER_PASS) a constant in each copy; called with `lut` NULL or not,
 * `sub16` and `code_max` as constants too, so every format gets a loop without the others' branches. */
static inline __attribute__((always_inline)) void tile_pass(
    const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t nblocks, int bits, int offset,
    const uint8_t *lut, const int sub16, const int code_max, const int8_t *qx, const float *dx,
    const int32_t *sumq, const float *sumx, int64_t k, float *y, int64_t ldy, int rows) {
    switch (rows) {
    case 4: tile_rows(codes, d, m, nblocks, bits, offset, lut, sub16, code_max, qx, dx, sumq, sumx, k, y, ldy, 4); break;
    case 3: tile_rows(codes, d, m, nblocks, bits, offset, lut, sub16, code_max, qx, dx, sumq, sumx, k, y, ldy, 3); break;
    case 2: tile_rows(codes, d, m, nblocks, bits, offset, lut, sub16, code_max, qx, dx, sumq, sumx, k, y, ldy, 2); break;
    default: tile_rows(codes, d, m, nblocks, bits, offset, lut, sub16, code_max, qx, dx, sumq, sumx, k, y, ldy, 1);
    }
}

/* y[M, N] (row stride ldy) = x[M, K] . W^T; `lut` NULL, or a 4-bit code book's 32 bytes (above);
 * `scale_block` 32 (codes of 4, 5 or 8 bits, or 4-bit codes into `lut`) or 16 (2, 3 or 6 bits, or 4-bit
 * codes into an integer `lut`).
 * Returns 0, -1 when scratch memory is unavailable, or -2 for another combination. */
int lamina_blockq_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const uint16_t *d,
                         const uint16_t *m, int64_t n, int bits, int offset, const uint8_t *lut, int scale_block,
                         float *y, int64_t ldy) {
    const int sub16 = scale_block == 16;
    if (lut ? bits != 4 : sub16 ? bits != 2 && bits != 3 && bits != 6 : bits != 4 && bits != 5 && bits != 8)
        return -2;
    const int64_t nblocks = k / BLOCK, ntiles = n / TILE;
    const int64_t tile_bytes = nblocks * (bits * BLOCK * TILE / 8);
    int8_t *qx = malloc(m_rows * 2 * k);
    float *dx = malloc(m_rows * 2 * nblocks * sizeof(float));
    int32_t *sumq = malloc(m_rows * 4 * nblocks * sizeof(int32_t));
    float *sumx = malloc(m_rows * 2 * nblocks * sizeof(float));
    if (!qx || !dx || !sumq || !sumx) {
        free(qx), free(dx), free(sumq), free(sumx);
        return -1;
    }
#pragma omp parallel if (m_rows * n * k > 65536)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m_rows; r++)
            quantize_row(x + r * k, k, qx + r * 2 * k, dx + r * 2 * nblocks, sumq + r * 4 * nblocks, sumx + r * 2 * nblocks);
        for (int64_t r0 = 0; r0 < m_rows; r0 += ROW_CHUNK) {
            const int64_t r1 = r0 + ROW_CHUNK < m_rows ? r0 + ROW_CHUNK : m_rows;
#pragma omp for schedule(static) nowait
            for (int64_t t = 0; t < ntiles; t++) {
                const uint8_t *tc = codes + t * tile_bytes;
                const int64_t per_tile = nblocks * (sub16 ? 2 : 1) * TILE; /* scales (and mins) per tile */
                const uint16_t *td = d + t * per_tile, *tm = m ? m + t * per_tile : NULL;
                for (int64_t r = r0; r < r1; r += ROWS_PER_PASS) {
                    const int64_t left = r1 - r;
                    const int8_t *q = qx + r * 2 * k;
                    const float *s = dx + r * 2 * nblocks, *sx = sumx + r * 2 * nblocks;
                    const int32_t *sq = sumq + r * 4 * nblocks;
                    float *out = y + r * ldy + t * TILE;
                    const int rows = left >= ROWS_PER_PASS ? ROWS_PER_PASS : (int)left;
                    if (lut && sub16) tile_pass(tc, td, tm, nblocks, 4, offset, lut, 1, 255, q, s, sq, sx, k, out, ldy, rows);
                    else if (lut) tile_pass(tc, td, tm, nblocks, 4, offset, lut, 0, 255, q, s, sq, sx, k, out, ldy, rows);
                    else if (sub16) tile_pass(tc, td, tm, nblocks, bits, offset, NULL, 1, 63, q, s, sq, sx, k, out, ldy, rows);
                    else if (bits == 8) tile_pass(tc, td, tm, nblocks, 8, offset, NULL, 0, 255, q, s, sq, sx, k, out, ldy, rows);
                    else if (bits == 4) tile_pass(tc, td, tm, nblocks, 4, offset, NULL, 0, 15, q, s, sq, sx, k, out, ldy, rows);
                    else tile_pass(tc, td, tm, nblocks, 5, offset, NULL, 0, 31, q, s, sq, sx, k, out, ldy, rows);
                }
            }
        }
    }
    free(qx), free(dx), free(sumq), free(sumx);
    return 0;
}
