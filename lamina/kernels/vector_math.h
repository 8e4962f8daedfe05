/* Vectorized e^x and SiLU shared by the kernels. */
#ifndef LAMINA_VECTOR_MATH_H
#define LAMINA_VECTOR_MATH_H
#include "simd.h"

/* e^x for x <= 0 (e.g. scores minus their maximum), ~1 ulp: 2^n * p(r), x = n ln2 + r. */
static inline vf exp_nonpositive(vf x) {
    x = vf_max(x, vf_set1(-87.0f));
    const vf n = vf_round(vf_mul(x, vf_set1(1.44269504088896341f)));
    vf r = vf_fnmadd(n, vf_set1(0.693359375f), x);
    r = vf_fnmadd(n, vf_set1(-2.12194440e-4f), r);
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fmadd(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fmadd(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fmadd(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fmadd(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fmadd(p, r, vf_set1(5.0000001201e-1f));
    p = vf_fmadd(p, vf_mul(r, r), vf_add(r, vf_set1(1.0f)));
    return vf_scale_pow2(p, n);
}

/* x * sigmoid(x) = x / (1 + e^-x), from e^-|x| so the exponent never overflows. */
static inline vf silu(vf x) {
    const vf e = exp_nonpositive(vf_sub(vf_zero(), vf_abs(x)));
    const vf one = vf_set1(1.0f);
    return vf_mul(x, vf_div(vf_where_negative(x, e, one), vf_add(one, e)));
}
#endif
