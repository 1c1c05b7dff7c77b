// Vectorised exp and exact GELU shared by the kernels (float32, simd.h's vectors).
#pragma once

#include "simd.h"

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {

// 2^t for t <= 127: 2^n * p(f) with n = round(t), f = t - n in [-1/2, 1/2] and p a degree-6 polynomial
// fitted to 2^f (relative error below 1e-7 in float32, so float32 rounding dominates); t below -126 gives
// 2^-126, so no result is subnormal.
inline simd::Vec pow2(simd::Vec t) {
  t = simd::max(t, simd::set1(-126.0f));
  const simd::Vec n = simd::round_nearest(t);
  const simd::Vec f = simd::sub(t, n);
  simd::Vec p = simd::set1(1.53458124e-4f);
  p = simd::fmadd(p, f, simd::set1(1.33999309e-3f));
  p = simd::fmadd(p, f, simd::set1(9.61848907e-3f));
  p = simd::fmadd(p, f, simd::set1(5.55032864e-2f));
  p = simd::fmadd(p, f, simd::set1(2.40226462e-1f));
  p = simd::fmadd(p, f, simd::set1(6.93147182e-1f));
  p = simd::fmadd(p, f, simd::set1(1.0f));
  return simd::scale_pow2(p, n);
}

constexpr float kLog2e = 1.44269504088896341f;  // exp(x) = 2^(x log2(e))

// Exact (erf) GELU, x * Phi(x), and with `derivative` also Phi(x) + x * phi(x). erf is the Abramowitz-Stegun
// 7.1.26 form that PyTorch's vectorised CPU GELU uses (absolute error below 1.5e-7); its exp(-x^2 / 2) also
// gives phi.
inline simd::Vec gelu(simd::Vec x, simd::Vec* derivative = nullptr) {
  const simd::Vec one = simd::set1(1.0f);
  const simd::Vec u = simd::mul(x, simd::set1(0.70710678118654752f));
  const simd::Vec t = simd::div(one, simd::fmadd(simd::set1(0.3275911f), simd::abs(u), one));
  simd::Vec poly = simd::fmadd(simd::set1(1.061405429f), t, simd::set1(-1.453152027f));
  poly = simd::fmadd(poly, t, simd::set1(1.421413741f));
  poly = simd::fmadd(poly, t, simd::set1(-0.284496736f));
  poly = simd::fmadd(poly, t, simd::set1(0.254829592f));
  const simd::Vec gauss = pow2(simd::mul(simd::mul(u, u), simd::set1(-kLog2e)));
  const simd::Vec erf_abs = simd::fnmadd(simd::mul(poly, t), gauss, one);
  const simd::Vec sign = simd::bit_and(u, simd::set1(-0.0f));
  const simd::Vec half = simd::set1(0.5f);
  const simd::Vec cdf = simd::fmadd(simd::bit_or(erf_abs, sign), half, half);
  if (derivative)
    *derivative = simd::fmadd(simd::mul(x, gauss), simd::set1(0.39894228040143268f), cdf);
  return simd::mul(x, cdf);
}

}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
