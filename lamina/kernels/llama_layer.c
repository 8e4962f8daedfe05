/* One Llama-family decoder layer for a few new rows (decode steps, speculative verify passes) in a
 * single call: the Python glue between kernels (norms, RoPE, cache writes, views, residual adds:
 * ~45 dispatched ops a layer, 4-5 ms of a 12 ms step for a 30-layer model) is replaced by loops
 * over a few hundred floats. The heavy parts are blockq.c's matmul and attention.c's attention.
 *
 *   x += o(attention(rope(qkv(rms_norm(x) * w1))))
 *   x += down(silu(gate) * up), gate | up = gate_up(rms_norm(x) * w2)
 *
 * x is [B * T, hidden] float32 (B sequences of T rows at positions start..start+T-1), updated in
 * place. Each projection is one or more weights whose outputs sit side by side: q/k/v fused (rows:
 * H query heads, then Hkv key heads, then Hkv value heads) or as three weights, gate/up fused (I
 * gate rows, then I up rows) or as two. A weight is GGUF blocks (blockq.c), LLM.int8 (llm_int8.c) or
 * dense float32 / 16-bit / float8 e4m3 with block scales (dense.c). RoPE is HF's half-split form with cos/sin [T, D]. keys/values are
 * the layer's cache [B, Hkv, L, D] (row stride D), written at the new positions before attending.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector_math.h"

int lamina_blockq_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const uint16_t *d,
                         const uint16_t *m, int64_t n, int bits, int offset, const uint8_t *lut, int scale_block,
                         float *y, int64_t ldy);
int lamina_llm_int8_matmul(const float *x, int64_t m_rows, int64_t k, const uint8_t *codes, const uint16_t *d,
                           const float *scales, int64_t n, float threshold, float *y, int64_t ldy);
void lamina_dense_linear(const float *x, int64_t m_rows, int64_t k, const void *w, int64_t n, const float *bias,
                         float *y, int64_t ldy, int kind);
void lamina_e4m3_linear(const float *x, int64_t m_rows, int64_t k, const uint8_t *w, int64_t n, const float *scales,
                        int64_t scale_rows, int64_t scale_cols, const float *bias, float *y, int64_t ldy);
int lamina_decode_attention(const float *q, int64_t q_sb, int64_t q_st, int64_t q_sh, const float *keys,
                            const float *values, int64_t kv_sb, int64_t kv_sh, int64_t kv_sl, int64_t batch,
                            int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t start, int64_t window,
                            float scale, float *out);

/* One weight: GGUF blocks as blockq.c takes them (codes != NULL; with outlier_scales, LLM.int8's 8-bit
 * tiles), or dense [N, K] (float32, fp16, bf16; with dense_scales, float8 e4m3). */
typedef struct {
    const uint8_t *codes;
    const uint16_t *d, *m;
    const void *dense;
    int64_t out_features, in_features;
    int32_t bits, offset;
    const uint8_t *lut; /* a 4-bit code book (blockq.c), or NULL */
    int64_t scale_block; /* weights per d: 32, or 16 */
    int64_t dense_kind;  /* dense weights: 0 float32, 1 fp16, 2 bfloat16 (dense.c) */
    const float *outlier_scales; /* LLM.int8 (llm_int8.c): 8-bit codes' float32 row scales, or NULL */
    float threshold;             /* LLM.int8: |x| from which an input column is an outlier */
    const int64_t *order;        /* input k of the weight is column order[k] of x (GPTQ act-order), or NULL */
    const float *dense_scales;   /* e4m3 weights (dense.c): scales per scale_rows x scale_cols block, or NULL */
    int64_t scale_rows, scale_cols;
} Weight;

/* A projection: up to 3 weights reading the same input, outputs side by side. */
typedef struct {
    Weight parts[3];
    int64_t count;
} Projection;

typedef struct {
    const float *norm1, *norm2; /* [hidden] RMSNorm weights before attention and before the MLP */
    Projection qkv, o, gate_up, down;
    int64_t hidden, heads, kv_heads, head_dim, intermediate, window; /* window 0: full attention */
    float eps, scale;
} LlamaLayer;

/* y [rows, sum of the parts' outputs] = x . W^T. */
static int matmul(const Projection *p, const float *x, int64_t rows, float *y) {
    int64_t width = 0, column = 0;
    for (int64_t i = 0; i < p->count; i++) width += p->parts[i].out_features;
    for (int64_t i = 0; i < p->count; i++) {
        const Weight *w = &p->parts[i];
        const int64_t k = w->in_features;
        const float *in = x;
        float *gathered = NULL;
        if (w->order) { /* x's columns in the weight's input order */
            gathered = malloc(rows * k * sizeof(float));
            if (!gathered) return -1;
            for (int64_t r = 0; r < rows; r++)
                for (int64_t j = 0; j < k; j++) gathered[r * k + j] = x[r * k + w->order[j]];
            in = gathered;
        }
        int status = 0;
        if (w->outlier_scales)
            status = lamina_llm_int8_matmul(in, rows, k, w->codes, w->d, w->outlier_scales, w->out_features,
                                            w->threshold, y + column, width);
        else if (w->dense_scales)
            lamina_e4m3_linear(in, rows, k, w->dense, w->out_features, w->dense_scales, w->scale_rows, w->scale_cols,
                               NULL, y + column, width);
        else if (w->codes)
            status = lamina_blockq_matmul(in, rows, k, w->codes, w->d, w->m, w->out_features, w->bits, w->offset,
                                          w->lut, (int)w->scale_block, y + column, width);
        else
            lamina_dense_linear(in, rows, k, w->dense, w->out_features, NULL, y + column, width,
                                (int)w->dense_kind);
        free(gathered);
        if (status) return -1;
        column += w->out_features;
    }
    return 0;
}

/* out = x * rsqrt(mean(x^2) + eps) * weight, one row. */
static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    float squares = 0.0f;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    const float inv = 1.0f / sqrtf(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * inv);
}

/* HF's rotate-half RoPE of one head in place: (a, b) -> (a cos - b sin, b cos + a sin). */
static void rope(float *head, const float *cos, const float *sin, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = head[i], b = head[i + half];
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* silu(gate) * up for one row (n a multiple of 16). */
static void silu_mul(const float *gate, const float *up, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i += 16)
        vf_store(out + i, vf_mul(silu(vf_load(gate + i)), vf_load(up + i)));
}

/* Returns 0, or -1 when scratch memory is unavailable or a kernel refuses its shape. */
int lamina_llama_layer(const LlamaLayer *layer, float *x, int64_t batch, int64_t rows, const float *cos,
                       const float *sin, float *keys, float *values, int64_t kv_sb, int64_t kv_sh, int64_t start) {
    const int64_t total = batch * rows, hidden = layer->hidden, dim = layer->head_dim;
    const int64_t heads = layer->heads, kv_heads = layer->kv_heads, inter = layer->intermediate;
    const int64_t qkv_width = (heads + 2 * kv_heads) * dim;
    const int64_t widest = qkv_width > 2 * inter ? qkv_width : 2 * inter;
    if (total == 0) return 0;
    float *normed = malloc(total * (hidden > inter ? hidden : inter) * sizeof(float));
    float *wide = malloc(total * widest * sizeof(float));
    float *attended = malloc(total * (heads * dim > hidden ? heads * dim : hidden) * sizeof(float));
    int status = normed && wide && attended ? 0 : -1;

    for (int64_t r = 0; r < total && !status; r++) rms_norm(x + r * hidden, layer->norm1, hidden, layer->eps, normed + r * hidden);
    if (!status) status = matmul(&layer->qkv, normed, total, wide); /* [B*T, (H + 2 Hkv) D] */
    for (int64_t r = 0; r < total && !status; r++) {
        const int64_t b = r / rows, t = r % rows;
        float *row = wide + r * qkv_width;
        for (int64_t h = 0; h < heads + kv_heads; h++) rope(row + h * dim, cos + t * dim, sin + t * dim, dim);
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = b * kv_sb + h * kv_sh + (start + t) * dim;
            memcpy(keys + at, row + (heads + h) * dim, dim * sizeof(float));
            memcpy(values + at, row + (heads + kv_heads + h) * dim, dim * sizeof(float));
        }
    }
    if (!status)
        status = lamina_decode_attention(wide, rows * qkv_width, qkv_width, dim, keys, values, kv_sb, kv_sh, dim,
                                         batch, rows, heads, kv_heads, dim, start, layer->window, layer->scale,
                                         attended); /* [B*T, H*D] */
    if (!status) status = matmul(&layer->o, attended, total, normed); /* [B*T, hidden] */
    for (int64_t r = 0; r < total && !status; r++) {
        float *xr = x + r * hidden;
        for (int64_t i = 0; i < hidden; i++) xr[i] += normed[r * hidden + i];
        rms_norm(xr, layer->norm2, hidden, layer->eps, attended + r * hidden);
    }
    if (!status) status = matmul(&layer->gate_up, attended, total, wide); /* [B*T, 2I] */
    for (int64_t r = 0; r < total && !status; r++)
        silu_mul(wide + r * 2 * inter, wide + r * 2 * inter + inter, inter, normed + r * inter);
    if (!status) status = matmul(&layer->down, normed, total, attended); /* [B*T, hidden] */
    for (int64_t r = 0; r < total && !status; r++)
        for (int64_t i = 0; i < hidden; i++) x[r * hidden + i] += attended[r * hidden + i];
    free(normed), free(wide), free(attended);
    return status;
}
