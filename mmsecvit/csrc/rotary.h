// 2-D rotary position embedding of q and k, applied by the kernels to packed rows that arrive unrotated
// (float32, AVX-512); include inside MMSECVIT_AVX512.
//
// Row r of the packed (B * N * heads, 3 * D) rows is token n = (r / heads) % N of an height x width map,
// at (y, x) = (n / width, n % width). Its q and k rotate adjacent channel pairs (c0, c1) -> (c0 cos - c1 sin,
// c1 cos + c0 sin): the first D / 2 channels by angles of y, the others by angles of x. `axes` holds, for
// every y and then every x, the D / 2 cosines of those channels' pairs (each twice) and the D / 2 signed
// sines (-sin, sin); k is also multiplied by the softmax scale.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

namespace mmsecvit {

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

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// Cosines and signed sines of row `row`'s channels, D / 16 vectors each.
template <int D>
inline void rotation_of(const Rope& rope, int64_t row, __m512* cos, __m512* sin) {
  const int64_t token = (row / rope.heads) % (rope.height * rope.width);
  const float* by_y = rope.axes + (token / rope.width) * D;
  const float* by_x = rope.axes + (rope.height + token % rope.width) * D;
  if constexpr (D == 32) {
    cos[0] = _mm512_loadu_ps(by_y);
    sin[0] = _mm512_loadu_ps(by_y + 16);
    cos[1] = _mm512_loadu_ps(by_x);
    sin[1] = _mm512_loadu_ps(by_x + 16);
  } else {
    static_assert(D == 16, "head_dim 16 or 32");
    cos[0] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(by_y)), _mm256_loadu_ps(by_x), 1);
    sin[0] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(by_y + 8)), _mm256_loadu_ps(by_x + 8), 1);
  }
}

// Rotation of 8 channel pairs (inverse: the transposed rotation, for gradients).
inline __m512 rotate(__m512 x, __m512 cos, __m512 sin) {
  return _mm512_fmadd_ps(_mm512_permute_ps(x, 0xB1), sin, _mm512_mul_ps(x, cos));
}
inline __m512 rotate_back(__m512 x, __m512 cos, __m512 sin) {
  return _mm512_fnmadd_ps(_mm512_permute_ps(x, 0xB1), sin, _mm512_mul_ps(x, cos));
}

// q and k of a packed row (3 * D values at `values`; the row's number is `row`) rotated in place and k
// scaled or, with `gradient`, q's and k's gradients taken back through that (the scale, then the inverse
// rotation).
template <int D>
inline void rotate_row(const Rope& rope, int64_t row, float* values, bool gradient = false) {
  __m512 cos[D / 16], sin[D / 16];
  rotation_of<D>(rope, row, cos, sin);
  const __m512 scale = _mm512_set1_ps(rope.key_scale);
  for (int v = 0; v < D / 16; ++v) {
    float* q = values + v * 16;
    float* k = values + D + v * 16;
    if (gradient) {
      _mm512_storeu_ps(q, rotate_back(_mm512_loadu_ps(q), cos[v], sin[v]));
      _mm512_storeu_ps(k, rotate_back(_mm512_mul_ps(_mm512_loadu_ps(k), scale), cos[v], sin[v]));
    } else {
      _mm512_storeu_ps(q, rotate(_mm512_loadu_ps(q), cos[v], sin[v]));
      _mm512_storeu_ps(k, _mm512_mul_ps(rotate(_mm512_loadu_ps(k), cos[v], sin[v]), scale));
    }
  }
}

#pragma GCC pop_options

}  // namespace mmsecvit
