// The float32 vector operations the kernels are written in, for the ISA this translation unit is compiled
// for: AVX-512 (__AVX512F__; 16 lanes) or AVX2 with FMA (8 lanes). setup.py compiles every kernel source
// once per ISA into its own module; the ISA's namespace (MMSECVIT_ISA_NAMESPACE) keeps their symbols apart.
#pragma once

#include <immintrin.h>

#if defined(__AVX512F__)
#define MMSECVIT_ISA_NAMESPACE avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define MMSECVIT_ISA_NAMESPACE avx2
#else
#error "mmsecvit kernels: compile with -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma, or -mavx2 -mfma"
#endif

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {
namespace simd {

#if defined(__AVX512F__)

constexpr int kLanes = 16;
constexpr const char* kIsa = "avx512";
using Vec = __m512;

inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1); }  // n in [0, 16]

inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
inline Vec load_first(const float* p, int n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }  // zeros past n
inline void store_first(float* p, Vec x, int n) { _mm512_mask_storeu_ps(p, first_lanes(n), x); }
inline void stream(float* p, Vec x) { _mm512_stream_ps(p, x); }  // p 64-byte aligned
// Lanes [0, n) of x, the others of fill.
inline Vec keep_first(Vec x, int n, Vec fill) { return _mm512_mask_blend_ps(first_lanes(n), fill, x); }
// Lanes [0, 8) from lo, [8, 16) from hi.
inline Vec load_halves(const float* lo, const float* hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(lo)), _mm256_loadu_ps(hi), 1);
}

inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec set1(float x) { return _mm512_set1_ps(x); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
inline Vec fmsub(Vec a, Vec b, Vec c) { return _mm512_fmsub_ps(a, b, c); }    // a b - c
inline Vec abs(Vec x) { return _mm512_abs_ps(x); }
inline Vec bit_and(Vec a, Vec b) { return _mm512_and_ps(a, b); }
inline Vec bit_or(Vec a, Vec b) { return _mm512_or_ps(a, b); }
inline float sum_lanes(Vec x) { return _mm512_reduce_add_ps(x); }
inline float max_lanes(Vec x) { return _mm512_reduce_max_ps(x); }
inline Vec round_nearest(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// x 2^n for integral n in [-126, 127].
inline Vec scale_pow2(Vec x, Vec n) { return _mm512_scalef_ps(x, n); }
// Lanes (0, 1), (2, 3), ... swapped.
inline Vec swap_pairs(Vec x) { return _mm512_permute_ps(x, 0xB1); }

// The 16 x 16 matrix whose rows are r[0..15], transposed in place.
inline void transpose(Vec* r) {
  Vec pairs[16];  // pairs[2i], pairs[2i + 1]: rows 2i and 2i + 1 interleaved, low and high halves of lanes
  for (int i = 0; i < 8; ++i) {
    pairs[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    pairs[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // quads[4i + m]: in lane k, column 4k + m of rows 4i .. 4i + 3.
  Vec quads[16];
  for (int i = 0; i < 4; ++i)
    for (int half = 0; half < 2; ++half) {
      const __m512d a = _mm512_castps_pd(pairs[4 * i + half]), b = _mm512_castps_pd(pairs[4 * i + 2 + half]);
      quads[4 * i + 2 * half] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      quads[4 * i + 2 * half + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  // Column 4k + m: lane k of quads[m], quads[4 + m], quads[8 + m], quads[12 + m].
  for (int m = 0; m < 4; ++m) {
    const Vec low01 = _mm512_shuffle_f32x4(quads[m], quads[4 + m], 0x44);
    const Vec low23 = _mm512_shuffle_f32x4(quads[8 + m], quads[12 + m], 0x44);
    const Vec high01 = _mm512_shuffle_f32x4(quads[m], quads[4 + m], 0xEE);
    const Vec high23 = _mm512_shuffle_f32x4(quads[8 + m], quads[12 + m], 0xEE);
    r[m] = _mm512_shuffle_f32x4(low01, low23, 0x88);
    r[4 + m] = _mm512_shuffle_f32x4(low01, low23, 0xDD);
    r[8 + m] = _mm512_shuffle_f32x4(high01, high23, 0x88);
    r[12 + m] = _mm512_shuffle_f32x4(high01, high23, 0xDD);
  }
}

#else  // AVX2 and FMA

constexpr int kLanes = 8;
constexpr const char* kIsa = "avx2";
using Vec = __m256;

// All ones in lanes [0, n), n in [0, 8].
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
inline Vec load_first(const float* p, int n) { return _mm256_maskload_ps(p, first_lanes(n)); }  // zeros past n
inline void store_first(float* p, Vec x, int n) { _mm256_maskstore_ps(p, first_lanes(n), x); }
inline void stream(float* p, Vec x) { _mm256_stream_ps(p, x); }  // p 32-byte aligned
// Lanes [0, n) of x, the others of fill.
inline Vec keep_first(Vec x, int n, Vec fill) {
  return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(first_lanes(n)));
}
// Lanes [0, 4) from lo, [4, 8) from hi.
inline Vec load_halves(const float* lo, const float* hi) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(lo)), _mm_loadu_ps(hi), 1);
}

inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec set1(float x) { return _mm256_set1_ps(x); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
inline Vec fmsub(Vec a, Vec b, Vec c) { return _mm256_fmsub_ps(a, b, c); }    // a b - c
inline Vec abs(Vec x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
inline Vec bit_and(Vec a, Vec b) { return _mm256_and_ps(a, b); }
inline Vec bit_or(Vec a, Vec b) { return _mm256_or_ps(a, b); }
inline float sum_lanes(Vec x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float max_lanes(Vec x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline Vec round_nearest(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// x 2^n for integral n in [-126, 127]: 2^n's exponent bits built directly.
inline Vec scale_pow2(Vec x, Vec n) {
  const __m256i exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(x, _mm256_castsi256_ps(_mm256_slli_epi32(exponent, 23)));
}
// Lanes (0, 1), (2, 3), ... swapped.
inline Vec swap_pairs(Vec x) { return _mm256_permute_ps(x, 0xB1); }

// The 8 x 8 matrix whose rows are r[0..7], transposed in place.
inline void transpose(Vec* r) {
  Vec pairs[8];  // pairs[2i], pairs[2i + 1]: rows 2i and 2i + 1 interleaved, low and high halves of lanes
  for (int i = 0; i < 4; ++i) {
    pairs[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    pairs[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // quads[4i + m]: columns m (low 128 bits) and 4 + m (high 128 bits) of rows 4i .. 4i + 3.
  Vec quads[8];
  for (int i = 0; i < 2; ++i)
    for (int half = 0; half < 2; ++half) {
      quads[4 * i + 2 * half] = _mm256_shuffle_ps(pairs[4 * i + half], pairs[4 * i + 2 + half], 0x44);
      quads[4 * i + 2 * half + 1] = _mm256_shuffle_ps(pairs[4 * i + half], pairs[4 * i + 2 + half], 0xEE);
    }
  for (int m = 0; m < 4; ++m) {
    r[m] = _mm256_permute2f128_ps(quads[m], quads[4 + m], 0x20);
    r[4 + m] = _mm256_permute2f128_ps(quads[m], quads[4 + m], 0x31);
  }
}

#endif

}  // namespace simd
}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
