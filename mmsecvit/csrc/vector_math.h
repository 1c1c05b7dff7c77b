// Vectorised exp and exact GELU shared by the kernels (float32, AVX-512); include inside MMSECVIT_AVX512.
#pragma once

#include <immintrin.h>

namespace mmsecvit {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// 2^t for t <= 127: 2^n * p(f) with n = round(t), f = t - n in [-1/2, 1/2] and p a degree-6 polynomial
// fitted to 2^f (relative error below 1e-7 in float32, so float32 rounding dominates); t below -126 gives
// 2^-126, so no result is subnormal.
inline __m512 pow2(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.53458124e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.33999309e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61848907e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55032864e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40226462e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93147182e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

constexpr float kLog2e = 1.44269504088896341f;  // exp(x) = 2^(x log2(e))

// Exact (erf) GELU, x * Phi(x), and with `derivative` also Phi(x) + x * phi(x). erf is the Abramowitz-Stegun
// 7.1.26 form that PyTorch's vectorised CPU GELU uses (absolute error below 1.5e-7); its exp(-x^2 / 2) also
// gives phi.
inline __m512 gelu(__m512 x, __m512* derivative = nullptr) {
  const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), _mm512_abs_ps(u), _mm512_set1_ps(1.0f)));
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  const __m512 gauss = pow2(_mm512_mul_ps(_mm512_mul_ps(u, u), _mm512_set1_ps(-kLog2e)));
  const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(poly, t), gauss, _mm512_set1_ps(1.0f));
  const __m512 sign = _mm512_and_ps(u, _mm512_set1_ps(-0.0f));
  const __m512 cdf = _mm512_fmadd_ps(_mm512_or_ps(erf_abs, sign), _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
  if (derivative)
    *derivative = _mm512_fmadd_ps(_mm512_mul_ps(x, gauss), _mm512_set1_ps(0.39894228040143268f), cdf);
  return _mm512_mul_ps(x, cdf);
}

#pragma GCC pop_options

}  // namespace mmsecvit
