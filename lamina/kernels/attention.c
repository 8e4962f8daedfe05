/* Causal attention of a few new query rows over a float32 KV cache: Lamina's CPU decode attention.
 *
 * q [B, T, H, D] (strided) at positions start..start+T-1, keys/values [B, Hkv, L, D] (strided),
 * out [B, T, H, D] contiguous. Row t attends positions lo..p with p = start + t and
 * lo = max(0, p - window + 1) (window 0: lo = 0), exactly as decoding the rows one at a time would;
 * query head h reads KV head h / (H / Hkv).
 *
 * Work is split into items (batch, KV head, row, chunk of CHUNK positions): each item computes, for
 * the query heads sharing its KV head, the chunk's score maximum, exp-sum and weighted value sum;
 * a second pass merges the chunks in position order. Chunk boundaries are fixed positions, so the
 * result does not depend on the thread count, on T, or on which rows share a call.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "vector_math.h"

#define CHUNK 256
#define MAX_GROUP 16 /* query heads per KV head handled together */
#define MAX_DIM 256

static inline float dot(const float *a, const float *b, int64_t dim) {
    vf acc = vf_mul(vf_load(a), vf_load(b));
    for (int64_t i = 16; i < dim; i += 16) acc = vf_fmadd(vf_load(a + i), vf_load(b + i), acc);
    return vf_sum(acc);
}

/* One chunk [first, last] of one row for `group` query heads: partial[g] = (max, sum, acc[dim]). */
static void attend_chunk(const float *const *qh, int group, const float *keys, const float *values, int64_t stride,
                         int64_t first, int64_t last, int64_t dim, float scale, float *scores, float *partial) {
    const int64_t n = last - first + 1;
    for (int g = 0; g < group; g++) {
        float *s = scores + g * CHUNK, mx = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            s[j] = dot(qh[g], keys + (first + j) * stride, dim) * scale;
            mx = s[j] > mx ? s[j] : mx;
        }
        vf total = vf_zero();
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            const vf e = exp_nonpositive(vf_sub(vf_load(s + j), vf_set1(mx)));
            vf_store(s + j, e);
            total = vf_add(total, e);
        }
        if (j < n) {
            const int tail = (int)(n - j);
            const vf e = vf_keep_first(exp_nonpositive(vf_sub(vf_load_first(s + j, tail), vf_set1(mx))), tail);
            vf_store_first(s + j, e, tail);
            total = vf_add(total, e);
        }
        float *out = partial + g * (dim + 2);
        out[0] = mx, out[1] = vf_sum(total);
        for (int64_t i = 0; i < dim; i += 64) { /* 64 features at a time held in 4 registers */
            const int wide = dim - i >= 64;
            vf acc[4] = {vf_zero(), vf_zero(), vf_zero(), vf_zero()};
            for (int64_t j = 0; j < n; j++) {
                const vf w = vf_set1(s[j]);
                const float *v = values + (first + j) * stride + i;
                if (wide) {
                    for (int u = 0; u < 4; u++) acc[u] = vf_fmadd(w, vf_load(v + 16 * u), acc[u]);
                } else {
                    for (int u = 0; u < (dim - i) / 16; u++)
                        acc[u] = vf_fmadd(w, vf_load(v + 16 * u), acc[u]);
                }
            }
            for (int u = 0; u < 4 && i + 16 * u < dim; u++) vf_store(out + 2 + i + 16 * u, acc[u]);
        }
    }
}

/* Returns 0, or -1 for an unsupported shape (dim not a multiple of 16 or > MAX_DIM, group > MAX_GROUP)
 * or when scratch memory is unavailable. */
int lamina_decode_attention(const float *q, int64_t q_sb, int64_t q_st, int64_t q_sh, const float *keys,
                            const float *values, int64_t kv_sb, int64_t kv_sh, int64_t kv_sl, int64_t batch,
                            int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t start, int64_t window,
                            float scale, float *out) {
    const int64_t group = heads / kv_heads;
    if (dim % 16 || dim > MAX_DIM || group > MAX_GROUP) return -1;
    const int64_t chunks = (start + rows - 1) / CHUNK + 1; /* chunk slots per row: positions 0..last */
    const int64_t items = batch * kv_heads * rows * chunks;
    float *partial = malloc(items * group * (dim + 2) * sizeof(float));
    if (!partial) return -1;
#pragma omp parallel if (items > 1)
    {
        float scores[MAX_GROUP * CHUNK];
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            const int64_t c = it % chunks, t = (it / chunks) % rows, kvh = (it / chunks / rows) % kv_heads;
            const int64_t b = it / chunks / rows / kv_heads, p = start + t;
            const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const int64_t first = c * CHUNK > lo ? c * CHUNK : lo, last = (c + 1) * CHUNK - 1 < p ? (c + 1) * CHUNK - 1 : p;
            float *part = partial + it * group * (dim + 2);
            if (first > last) { /* nothing of this row falls in this chunk */
                for (int64_t g = 0; g < group; g++) part[g * (dim + 2)] = -INFINITY;
                continue;
            }
            const float *qh[MAX_GROUP];
            for (int64_t g = 0; g < group; g++) qh[g] = q + b * q_sb + t * q_st + (kvh * group + g) * q_sh;
            const int64_t kv_offset = b * kv_sb + kvh * kv_sh;
            attend_chunk(qh, (int)group, keys + kv_offset, values + kv_offset, kv_sl, first, last, dim, scale, scores,
                         part);
        }
#pragma omp for schedule(static)
        for (int64_t row = 0; row < batch * rows * heads; row++) { /* merge the chunks, in position order */
            const int64_t h = row % heads, t = (row / heads) % rows, b = row / heads / rows;
            const int64_t kvh = h / group, g = h % group;
            const float *first_part = partial + ((((b * kv_heads + kvh) * rows + t) * chunks) * group + g) * (dim + 2);
            float mx = -INFINITY;
            for (int64_t c = 0; c < chunks; c++) {
                float m = first_part[c * group * (dim + 2)];
                mx = m > mx ? m : mx;
            }
            float *o = out + ((b * rows + t) * heads + h) * dim;
            float total = 0.0f;
            for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                const float *part = first_part + c * group * (dim + 2);
                if (part[0] == -INFINITY) continue;
                const float w = expf(part[0] - mx);
                total += w * part[1];
                for (int64_t i = 0; i < dim; i++) o[i] += w * part[2 + i];
            }
            for (int64_t i = 0; i < dim; i++) o[i] /= total;
        }
    }
    free(partial);
    return 0;
}
