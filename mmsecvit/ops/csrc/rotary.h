// 2-D rotary position embedding of q and k, applied by the kernels to packed rows that arrive unrotated
// (float32, simd.h's vectors).
//
// Row r of the packed (B * N * heads, 3 * D) rows is token n = (r / heads) % N of an height x width map,
// at (y, x) = (n / width, n % width). Its q and k rotate adjacent channel pairs (c0, c1) -> (c0 cos - c1 sin,
// c1 cos + c0 sin): the first D / 2 channels by angles of y, the others by angles of x. `axes` holds, for
// every y and then every x, the D / 2 cosines of those channels' pairs (each twice) and the D / 2 signed
// sines (-sin, sin); k is also multiplied by the softmax scale.
#pragma once

#include <ATen/ATen.h>

#include "simd.h"

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {

struct Rope {
  const float* axes = nullptr;  // (height + width, 2, D / 2), or null: the rows are already rotated
  int64_t heads = 1, height = 0, width = 0;
  float key_scale = 1.0f;

  bool enabled() const { return axes != nullptr; }
};

// Checks the rotation table of the kernels' rope arguments and returns the Rope they describe.
inline Rope make_rope(const c10::optional<at::Tensor>& axes, int64_t heads, int64_t height, int64_t width,
                      double key_scale, const at::Tensor& rows) {
  Rope rope;
  if (!axes.has_value() || !axes->defined()) return rope;
  const int64_t half = rows.size(1) / 6;
  TORCH_CHECK(heads >= 1 && height >= 1 && width >= 1 && rows.size(0) % (heads * height * width) == 0,
              "rope: rows must be (images * height * width * heads) rows, got ", rows.size(0), " for heads ", heads,
              ", height ", height, ", width ", width);
  TORCH_CHECK(axes->device().is_cpu() && axes->scalar_type() == at::kFloat && axes->is_contiguous() &&
                  axes->dim() == 3 && axes->size(0) == height + width && axes->size(1) == 2 && axes->size(2) == half,
              "rope: the table must be a contiguous float32 (height + width, 2, head_dim / 2) tensor");
  rope.axes = axes->data_ptr<float>();
  rope.heads = heads;
  rope.height = height;
  rope.width = width;
  rope.key_scale = static_cast<float>(key_scale);
  return rope;
}

// Cosines and signed sines of the channels of the token at (y, x), D / kLanes vectors each.
template <int D>
inline void rotation_at(const Rope& rope, int64_t y, int64_t x, simd::Vec* cos, simd::Vec* sin) {
  constexpr int kHalf = D / 2;  // channels rotated by y, then as many by x
  const float* by_y = rope.axes + y * D;
  const float* by_x = rope.axes + (rope.height + x) * D;
  if constexpr (simd::kLanes <= kHalf) {
    for (int v = 0; v < D / simd::kLanes; ++v) {
      const int channel = v * simd::kLanes;
      const float* table = channel < kHalf ? by_y + channel : by_x + channel - kHalf;
      cos[v] = simd::load(table);
      sin[v] = simd::load(table + kHalf);
    }
  } else {
    static_assert(D == simd::kLanes, "one vector holds the y half and the x half");
    cos[0] = simd::load_halves(by_y, by_x);
    sin[0] = simd::load_halves(by_y + kHalf, by_x + kHalf);
  }
}

// The same for packed row `row`.
template <int D>
inline void rotation_of(const Rope& rope, int64_t row, simd::Vec* cos, simd::Vec* sin) {
  const int64_t token = (row / rope.heads) % (rope.height * rope.width);
  rotation_at<D>(rope, token / rope.width, token % rope.width, cos, sin);
}

// Rotation of kLanes / 2 channel pairs (inverse: the transposed rotation, for gradients).
inline simd::Vec rotate(simd::Vec x, simd::Vec cos, simd::Vec sin) {
  return simd::fmadd(simd::swap_pairs(x), sin, simd::mul(x, cos));
}
inline simd::Vec rotate_back(simd::Vec x, simd::Vec cos, simd::Vec sin) {
  return simd::fnmadd(simd::swap_pairs(x), sin, simd::mul(x, cos));
}

// q and k of a packed row (3 * D values at `values`; the row's number is `row`) rotated in place and k
// scaled or, with `gradient`, q's and k's gradients taken back through that (the scale, then the inverse
// rotation).
template <int D>
inline void rotate_row(const Rope& rope, int64_t row, float* values, bool gradient = false) {
  constexpr int V = D / simd::kLanes;
  simd::Vec cos[V], sin[V];
  rotation_of<D>(rope, row, cos, sin);
  const simd::Vec scale = simd::set1(rope.key_scale);
  for (int v = 0; v < V; ++v) {
    float* q = values + v * simd::kLanes;
    float* k = values + D + v * simd::kLanes;
    if (gradient) {
      simd::store(q, rotate_back(simd::load(q), cos[v], sin[v]));
      simd::store(k, rotate_back(simd::mul(simd::load(k), scale), cos[v], sin[v]));
    } else {
      simd::store(q, rotate(simd::load(q), cos[v], sin[v]));
      simd::store(k, simd::mul(rotate(simd::load(k), cos[v], sin[v]), scale));
    }
  }
}

}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
