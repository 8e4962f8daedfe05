/* HQQ's zero points for int4 (lamina/quant/hqq.py explains the method; this is its fast path on CPU).
 *
 * The torch version passes over the whole layer ~14 times a step, 20 steps. Here each group's steps
 * run while its weights sit in L1, and the layer is read twice: once to find the step at which the
 * layer's mean |w - w_r| stops falling (the rule is over the whole layer, so every group runs every
 * step and the error sums are added up per step), once to run each group to that step and store its
 * zero. A group whose zero comes back unchanged is at a fixed point: its later steps would repeat it,
 * so they are not computed.
 *
 * Per element the float operations are the torch version's (hqq's), in its order. A group's mean
 * sums 16 lanes, then a fixed tree, where torch sums in another order, so the zeros match the torch
 * ones to about an ulp and their bfloat16 roundings almost always exactly; the `pow` of the shrink is
 * libm's. Error sums are added in double per part of PART groups in group order, then the parts in
 * order, so the result does not depend on the thread count; their mean is rounded to float32 before
 * the stopping test, as hqq's is (in double the test sees gains below float32's resolution and runs on).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define PART 256 /* groups per partial error sum */
#define LEVELS 15.0f

/* The shrink of the l_p proximal step for 16 errors e, and the zero update's terms q - (w - shrink) * c. */
static void shrunk_terms(vf wv, vf q, vf e, float inverse, float beta, float p, float *terms) {
    float w_[16], q_[16], e_[16];
    vf_store(w_, wv), vf_store(q_, q), vf_store(e_, e);
    for (int j = 0; j < 16; j++) {
        const float magnitude = fabsf(e_[j]);
        const float shrunk = fmaxf(magnitude - powf(magnitude, p - 1.0f) * (1.0f / beta), 0.0f);
        const float sign = (e_[j] > 0.0f) - (e_[j] < 0.0f);
        terms[j] = q_[j] - (w_[j] - shrunk * sign) * inverse;
    }
}

/* One step on a group w[0..g-1] (g a multiple of 16) from `zero`: returns the new zero and adds
 * sum |w - w_r| to *error. */
static float step(const float *w, int64_t g, float inverse, float zero, float beta, float p, float no_shrink_below,
                  double *error) {
    const vf c = vf_set1(inverse), z = vf_set1(zero), lowest = vf_zero(), highest = vf_set1(LEVELS);
    vf error_sum = vf_zero(), terms = vf_zero();
    for (int64_t i = 0; i < g; i += 16) {
        const vf wv = vf_load(w + i);
        const vf wc = vf_mul(wv, c);
        const vf q = vf_min(vf_max(vf_round(vf_add(wc, z)), lowest), highest);
        const vf e = vf_sub(wv, vf_div(vf_sub(q, z), c)); /* w - w_r */
        const vf magnitude = vf_abs(e);
        error_sum = vf_add(error_sum, magnitude);
        if (vf_max_lane(magnitude) >= no_shrink_below) {
            float shrunk[16];
            shrunk_terms(wv, q, e, inverse, beta, p, shrunk);
            terms = vf_add(terms, vf_load(shrunk));
        } else { /* the shrink is zero in every lane: w - 0 is w */
            terms = vf_add(terms, vf_sub(q, wc));
        }
    }
    *error += vf_sum(error_sum);
    return vf_sum(terms) / (float)g;
}

/* w [groups, g] float32 (g a multiple of 16); inverse [groups] = 15 / range; zero [groups], the
 * starting zeros, overwritten with the final ones. Up to `iters` steps, stopping as hqq does: at the
 * first step whose layer-wide mean error is not below the best so far, keeping that step's zeros.
 * No shrink is computed while every |error| of a 16-lane vector is below `no_shrink_below` (the
 * shrink is exactly zero there). Returns the number of steps taken, or -1 without memory. */
int lamina_hqq_zeros(const float *w, int64_t groups, int64_t g, const float *inverse, float *zero, int iters,
                     float beta, float p, float no_shrink_below) {
    if (iters <= 0 || groups <= 0) return 0;
    const int64_t parts = (groups + PART - 1) / PART;
    double *partial = calloc((size_t)(parts * iters), sizeof(double)); /* [parts, iters] error sums */
    if (!partial) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t part = 0; part < parts; part++) {
        double *sums = partial + part * iters;
        for (int64_t row = part * PART; row < groups && row < (part + 1) * PART; row++) {
            float z = zero[row];
            for (int i = 0; i < iters; i++) {
                double error = 0.0;
                const float next = step(w + row * g, g, inverse[row], z, beta, p, no_shrink_below, &error);
                sums[i] += error;
                if (next == z) { /* a fixed point: every later step repeats this one */
                    for (int j = i + 1; j < iters; j++) sums[j] += error;
                    break;
                }
                z = next;
            }
        }
    }
    int steps = iters;
    float best = INFINITY;
    for (int i = 0; i < iters; i++) {
        double total = 0.0;
        for (int64_t part = 0; part < parts; part++) total += partial[part * iters + i];
        const float mean = (float)(total / (double)(groups * g)); /* hqq's float32 mean: its ties too */
        if (mean >= best) {
            steps = i + 1;
            break;
        }
        best = mean;
    }
    free(partial);
#pragma omp parallel for schedule(static)
    for (int64_t row = 0; row < groups; row++) {
        float z = zero[row];
        double unused = 0.0;
        for (int i = 0; i < steps; i++) {
            const float next = step(w + row * g, g, inverse[row], z, beta, p, no_shrink_below, &unused);
            if (next == z) break;
            z = next;
        }
        zero[row] = z;
    }
    return steps;
}
