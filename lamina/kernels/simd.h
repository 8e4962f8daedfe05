/* 16-lane vectors for Lamina's kernels: one AVX-512 register each, or two AVX2 registers.
 *
 * The kernels are written once against `vf` (16 floats) and `vi` (64 bytes, or 16 int32) and the
 * functions below. Built with AVX-512 (F, BW, VL, VNNI: Zen 4, Xeons since Cascade Lake) each
 * function is one instruction or a few; built with AVX2 + FMA + F16C (Intel client CPUs since
 * Haswell, Zen 1-3: most laptops) each vector is a pair of 256-bit registers, and VPDPBUSD, masks
 * and mask moves are composed from AVX2 instructions. Both builds do the same operations in every
 * lane, horizontal sums in one fixed tree, and integer dot products exactly, so they give
 * bit-identical results (tests/kernels/test_isa.py compares them).
 */
#ifndef LAMINA_SIMD_H
#define LAMINA_SIMD_H
#include <immintrin.h>
#include <stdint.h>

#define SIMD_INLINE static inline __attribute__((always_inline))

/* The fixed horizontal-sum tree (GCC's for _mm512_reduce_add_ps): (hi + lo) halves down to a lane. */
SIMD_INLINE float sum_halves(__m256 half_sum) {
    const __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(half_sum, 1), _mm256_castps256_ps128(half_sum));
    const __m128 s2 = _mm_add_ps(s4, _mm_shuffle_ps(s4, s4, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(s2) + _mm_cvtss_f32(_mm_shuffle_ps(s2, s2, 1));
}

/* 16 float8 e4m3 bytes -> 16 fp16 words for the same numbers times 2^-8: the byte's exponent and
 * mantissa bits placed at fp16's bits 7..13 and its sign at bit 15 (fp16's exponent bias, 15, is e4m3's
 * 7 plus 8; subnormals map to subnormals). Exact for every finite e4m3 value. Sign-extending the byte
 * to 16 bits and shifting by 7 puts the sign at bits 14 and 15: bit 14 is masked off. */
SIMD_INLINE __m256i half_from_e4m3(const uint8_t *p) {
    const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16((short)0xBF80));
}

#ifdef __AVX512F__

typedef __m512 vf;
typedef __m512i vi;

SIMD_INLINE vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
SIMD_INLINE void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
/* Lanes 0..n-1 from p (n <= 16), the rest 0; memory past them is not read. */
SIMD_INLINE vf vf_load_first(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
SIMD_INLINE void vf_store_first(float *p, vf a, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), a); }
/* a with lanes n..15 set to 0. */
SIMD_INLINE vf vf_keep_first(vf a, int n) { return _mm512_maskz_mov_ps((__mmask16)((1u << n) - 1), a); }
SIMD_INLINE vf vf_set1(float a) { return _mm512_set1_ps(a); }
SIMD_INLINE vf vf_zero(void) { return _mm512_setzero_ps(); }
SIMD_INLINE vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
SIMD_INLINE vf vf_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
SIMD_INLINE vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
SIMD_INLINE vf vf_div(vf a, vf b) { return _mm512_div_ps(a, b); }
SIMD_INLINE vf vf_max(vf a, vf b) { return _mm512_max_ps(a, b); }
SIMD_INLINE vf vf_min(vf a, vf b) { return _mm512_min_ps(a, b); }
SIMD_INLINE vf vf_abs(vf a) { return _mm512_abs_ps(a); }
/* a * b + c and c - a * b, fused (one rounding). */
SIMD_INLINE vf vf_fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
SIMD_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }
SIMD_INLINE vf vf_round(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* p * 2^n for integral n in [-126, 127]. */
SIMD_INLINE vf vf_scale_pow2(vf p, vf n) { return _mm512_scalef_ps(p, n); }
/* if_negative where x < 0, else otherwise. */
SIMD_INLINE vf vf_where_negative(vf x, vf if_negative, vf otherwise) {
    return _mm512_mask_mov_ps(otherwise, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), if_negative);
}
SIMD_INLINE float vf_sum(vf a) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
    return sum_halves(_mm256_add_ps(hi, _mm512_castps512_ps256(a)));
}
SIMD_INLINE float vf_max_lane(vf a) { return _mm512_reduce_max_ps(a); }
/* 16 fp16 values -> float. */
SIMD_INLINE vf vf_from_half(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
/* 16 bfloat16 values -> float (a bfloat16 is a float's top 16 bits). */
SIMD_INLINE vf vf_from_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
SIMD_INLINE vf vf_from_i32(vi a) { return _mm512_cvtepi32_ps(a); }
/* 16 float8 e4m3 values -> float, times 2^-8 (`half_from_e4m3`). */
SIMD_INLINE vf vf_from_e4m3(const uint8_t *p) { return _mm512_cvtph_ps(half_from_e4m3(p)); }

SIMD_INLINE vi vi_load(const void *p) { return _mm512_loadu_si512(p); }
SIMD_INLINE vi vi_zero(void) { return _mm512_setzero_si512(); }
SIMD_INLINE vi vi_set1_i8(char a) { return _mm512_set1_epi8(a); }
SIMD_INLINE vi vi_set1_i32(int32_t a) { return _mm512_set1_epi32(a); }
SIMD_INLINE vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
SIMD_INLINE vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
/* Each 16-bit lane shifted right by `count` bits. */
SIMD_INLINE vi vi_srl16(vi a, unsigned count) { return _mm512_srli_epi16(a, count); }
/* The 16 bytes at p in every 128-bit lane (a table for vi_lookup). */
SIMD_INLINE vi vi_broadcast16(const uint8_t *p) { return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p)); }
/* Byte i = table's byte (index_i mod 16) of the same 128-bit lane (index_i < 128). */
SIMD_INLINE vi vi_lookup(vi table, vi index) { return _mm512_shuffle_epi8(table, index); }
/* Byte i = value where bit i of `bits` is set, else 0. */
SIMD_INLINE vi vi_bytes_from_bits(uint64_t bits, char value) {
    return _mm512_maskz_mov_epi8(_cvtu64_mask64(bits), _mm512_set1_epi8(value));
}
/* acc + sum over j < count of the 4 products u[j] (unsigned bytes) x s[j] (4 signed bytes) in each
 * int32 lane, exactly: one VPDPBUSD per vector. `code_max` (a constant) bounds the u bytes; the
 * AVX2 build needs it. */
SIMD_INLINE vi vi_dot4_sum(vi acc, const vi *u, const int32_t *s, int count, int code_max) {
    (void)code_max;
    for (int j = 0; j < count; j++) acc = _mm512_dpbusd_epi32(acc, u[j], _mm512_set1_epi32(s[j]));
    return acc;
}
/* Float lanes rounded to nearest even int32. */
SIMD_INLINE vi vi_round_f(vf a) { return _mm512_cvtps_epi32(a); }
/* The 16 int32 lanes (each in -128..127) stored as 16 bytes. */
SIMD_INLINE void vi_store_i8(int8_t *p, vi a) { _mm_storeu_si128((__m128i *)p, _mm512_cvtepi32_epi8(a)); }
SIMD_INLINE int32_t vi_sum_i32(vi a) { return _mm512_reduce_add_epi32(a); }

#else /* AVX2 + FMA + F16C: each vector is two 256-bit halves, lanes 0-7 in lo */

typedef struct {
    __m256 lo, hi;
} vf;
typedef struct {
    __m256i lo, hi;
} vi;

/* Lane mask (all ones in lanes 0..n-1 of the 16) for maskload/maskstore, as two halves. */
SIMD_INLINE void first_lanes(int n, __m256i *lo, __m256i *hi) {
    const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    *lo = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), index);
    *hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), index);
}

SIMD_INLINE vf vf_load(const float *p) { return (vf){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
SIMD_INLINE void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
SIMD_INLINE vf vf_load_first(const float *p, int n) {
    __m256i lo, hi;
    first_lanes(n, &lo, &hi);
    return (vf){_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p + 8, hi)};
}
SIMD_INLINE void vf_store_first(float *p, vf a, int n) {
    __m256i lo, hi;
    first_lanes(n, &lo, &hi);
    _mm256_maskstore_ps(p, lo, a.lo), _mm256_maskstore_ps(p + 8, hi, a.hi);
}
SIMD_INLINE vf vf_keep_first(vf a, int n) {
    __m256i lo, hi;
    first_lanes(n, &lo, &hi);
    return (vf){_mm256_and_ps(a.lo, _mm256_castsi256_ps(lo)), _mm256_and_ps(a.hi, _mm256_castsi256_ps(hi))};
}
SIMD_INLINE vf vf_set1(float a) { return (vf){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
SIMD_INLINE vf vf_zero(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
SIMD_INLINE vf vf_add(vf a, vf b) { return (vf){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
SIMD_INLINE vf vf_sub(vf a, vf b) { return (vf){_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
SIMD_INLINE vf vf_mul(vf a, vf b) { return (vf){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
SIMD_INLINE vf vf_div(vf a, vf b) { return (vf){_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
SIMD_INLINE vf vf_max(vf a, vf b) { return (vf){_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
SIMD_INLINE vf vf_min(vf a, vf b) { return (vf){_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
SIMD_INLINE vf vf_abs(vf a) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    return (vf){_mm256_andnot_ps(sign, a.lo), _mm256_andnot_ps(sign, a.hi)};
}
SIMD_INLINE vf vf_fmadd(vf a, vf b, vf c) { return (vf){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
SIMD_INLINE vf vf_fnmadd(vf a, vf b, vf c) { return (vf){_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
SIMD_INLINE vf vf_round(vf a) {
    const int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    return (vf){_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
/* 2^n built in the exponent field: exact for integral n in [-126, 127], so p * 2^n rounds as scalef. */
SIMD_INLINE __m256 pow2(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
SIMD_INLINE vf vf_scale_pow2(vf p, vf n) { return (vf){_mm256_mul_ps(p.lo, pow2(n.lo)), _mm256_mul_ps(p.hi, pow2(n.hi))}; }
SIMD_INLINE vf vf_where_negative(vf x, vf if_negative, vf otherwise) {
    const __m256 zero = _mm256_setzero_ps();
    return (vf){_mm256_blendv_ps(otherwise.lo, if_negative.lo, _mm256_cmp_ps(x.lo, zero, _CMP_LT_OQ)),
                _mm256_blendv_ps(otherwise.hi, if_negative.hi, _mm256_cmp_ps(x.hi, zero, _CMP_LT_OQ))};
}
SIMD_INLINE float vf_sum(vf a) { return sum_halves(_mm256_add_ps(a.hi, a.lo)); }
SIMD_INLINE float vf_max_lane(vf a) {
    const __m256 m8 = _mm256_max_ps(a.lo, a.hi);
    const __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m8, 1), _mm256_castps256_ps128(m8));
    const __m128 m2 = _mm_max_ps(m4, _mm_shuffle_ps(m4, m4, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_max_ps(m2, _mm_shuffle_ps(m2, m2, 1)));
}
SIMD_INLINE vf vf_from_half(const uint16_t *p) {
    return (vf){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
}
SIMD_INLINE __m256 bf16_half(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
SIMD_INLINE vf vf_from_bf16(const uint16_t *p) { return (vf){bf16_half(p), bf16_half(p + 8)}; }
SIMD_INLINE vf vf_from_i32(vi a) { return (vf){_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
SIMD_INLINE vf vf_from_e4m3(const uint8_t *p) {
    const __m256i h = half_from_e4m3(p);
    return (vf){_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}

SIMD_INLINE vi vi_load(const void *p) {
    return (vi){_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1)};
}
SIMD_INLINE vi vi_zero(void) { return (vi){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
SIMD_INLINE vi vi_set1_i8(char a) { return (vi){_mm256_set1_epi8(a), _mm256_set1_epi8(a)}; }
SIMD_INLINE vi vi_set1_i32(int32_t a) { return (vi){_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
SIMD_INLINE vi vi_and(vi a, vi b) { return (vi){_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
SIMD_INLINE vi vi_or(vi a, vi b) { return (vi){_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
SIMD_INLINE vi vi_srl16(vi a, unsigned count) { return (vi){_mm256_srli_epi16(a.lo, count), _mm256_srli_epi16(a.hi, count)}; }
SIMD_INLINE vi vi_broadcast16(const uint8_t *p) {
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return (vi){table, table};
}
SIMD_INLINE vi vi_lookup(vi table, vi index) {
    return (vi){_mm256_shuffle_epi8(table.lo, index.lo), _mm256_shuffle_epi8(table.hi, index.hi)};
}
/* 32 bits -> 32 bytes: byte i takes byte i / 8 of the word, then keeps bit i % 8. */
SIMD_INLINE __m256i bytes_from_bits32(uint32_t bits, __m256i value) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i bytes = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(bytes, bit), value);
}
SIMD_INLINE vi vi_bytes_from_bits(uint64_t bits, char value) {
    const __m256i v = _mm256_set1_epi8(value);
    return (vi){bytes_from_bits32((uint32_t)bits, v), bytes_from_bits32((uint32_t)(bits >> 32), v)};
}
/* VPMADDUBSW sums u8 x s8 pairs to int16, saturating past 32767. With u bytes of at most `code_max`
 * (< 128) a pair stays within 2 * 128 * code_max, so runs of that many pair sums are added in int16
 * before one VPMADDWD widens them (8 vectors of 4-bit codes in one run). Bytes of 128 or more are
 * split into their low 7 bits and their top bit, each of whose pair sums fits. Exact either way. */
SIMD_INLINE __m256i dot4_wide(__m256i acc, __m256i u, __m256i s) {
    const __m256i ones = _mm256_set1_epi16(1), low7 = _mm256_set1_epi8(0x7F), top = _mm256_set1_epi8((char)0x80);
    const __m256i low = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, low7), s), ones);
    const __m256i high = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, top), s), ones);
    return _mm256_add_epi32(acc, _mm256_add_epi32(low, high));
}
SIMD_INLINE vi vi_dot4_sum(vi acc, const vi *u, const int32_t *s, int count, int code_max) {
    if (code_max >= 128) {
        for (int j = 0; j < count; j++) {
            const __m256i sj = _mm256_set1_epi32(s[j]);
            acc = (vi){dot4_wide(acc.lo, u[j].lo, sj), dot4_wide(acc.hi, u[j].hi, sj)};
        }
        return acc;
    }
    const int run = 32767 / (2 * 128 * code_max);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int j0 = 0; j0 < count; j0 += run) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int j = j0; j < j0 + run && j < count; j++) {
            const __m256i sj = _mm256_set1_epi32(s[j]);
            lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(u[j].lo, sj));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(u[j].hi, sj));
        }
        acc = (vi){_mm256_add_epi32(acc.lo, _mm256_madd_epi16(lo, ones)), _mm256_add_epi32(acc.hi, _mm256_madd_epi16(hi, ones))};
    }
    return acc;
}
SIMD_INLINE vi vi_round_f(vf a) { return (vi){_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
/* Packing saturates where AVX-512's VPMOVDB truncates: the same for lanes in -128..127. */
SIMD_INLINE void vi_store_i8(int8_t *p, vi a) {
    const __m128i lo = _mm_packs_epi32(_mm256_castsi256_si128(a.lo), _mm256_extracti128_si256(a.lo, 1));
    const __m128i hi = _mm_packs_epi32(_mm256_castsi256_si128(a.hi), _mm256_extracti128_si256(a.hi, 1));
    _mm_storeu_si128((__m128i *)p, _mm_packs_epi16(lo, hi));
}
SIMD_INLINE int32_t vi_sum_i32(vi a) {
    const __m256i s8 = _mm256_add_epi32(a.lo, a.hi);
    const __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(s8, 1), _mm256_castsi256_si128(s8));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
}

#endif
#endif
