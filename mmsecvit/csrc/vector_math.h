// Vectorised exp and exact GELU shared by the kernels (float32, AVX-512); include inside MMSECVIT_AVX512.
#pragma once

#include <immintrin.h>

namespace mmsecvit {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// exp(x) for x <= 0: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and p the degree-7 Taylor polynomial
// (truncation error below 1e-8, so float32 rounding dominates); inputs below -87.3 give exp(-87.3).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

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
  const __m512 gauss = exp_nonpositive(_mm512_mul_ps(_mm512_set1_ps(-1.0f), _mm512_mul_ps(u, u)));
  const __m512 erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(poly, t), gauss, _mm512_set1_ps(1.0f));
  const __m512 sign = _mm512_and_ps(u, _mm512_set1_ps(-0.0f));
  const __m512 cdf = _mm512_fmadd_ps(_mm512_or_ps(erf_abs, sign), _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f));
  if (derivative)
    *derivative = _mm512_fmadd_ps(_mm512_mul_ps(x, gauss), _mm512_set1_ps(0.39894228040143268f), cdf);
  return _mm512_mul_ps(x, cdf);
}

#pragma GCC pop_options

}  // namespace mmsecvit
