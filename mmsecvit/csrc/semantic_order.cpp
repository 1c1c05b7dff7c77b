// Ranking of SEC attention: per image and head, the tokens in ascending order of the cosine similarity of
// their key to the keys' sum (the centre; its length does not change the order).
//
// `rows` is (B * N * heads, 3 * D), one row per (image, token, head) holding q, k and v, as for the cluster
// attention kernel. One thread ranks one (image, head): a pass over the keys sums them, a second scores
// every token, and a stable least-significant-digit radix sort of order-preserving 32-bit keys (four
// passes of 8 bits) ranks the scores. Equal scores keep token order, as PyTorch's stable sort does.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef MMSECVIT_AVX512
#include "rotary.h"
#endif

namespace mmsecvit {
namespace {

#ifdef MMSECVIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// Unsigned integers that order like the floats (negative floats reversed, then the sign bit flipped).
inline uint32_t order_preserving_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Key of token n (D / 16 vectors), rotated when `rope` is enabled (its scale does not change the ranking).
template <int D>
inline void load_key(const float* keys, int64_t n, int64_t token_stride, const Rope& rope, int64_t first_row,
                     __m512* k) {
  for (int v = 0; v < D / 16; ++v) k[v] = _mm512_loadu_ps(keys + n * token_stride + v * 16);
  if (rope.enabled()) {
    __m512 cos[D / 16], sin[D / 16];
    rotation_of<D>(rope, first_row + n * rope.heads, cos, sin);
    for (int v = 0; v < D / 16; ++v) k[v] = rotate(k[v], cos[v], sin[v]);
  }
}

// Scores of one (image, head): dot(k_n, centre) / max(|k_n|, 1e-12) for every token n, as sortable keys.
// `first_row` is the packed row of its token 0 (for the rotation).
template <int D>
void score_keys(const float* keys, int64_t tokens, int64_t token_stride, const Rope& rope, int64_t first_row,
                uint32_t* out) {
  constexpr int V = D / 16;
  // The keys' sum in float64 (a float32 running sum over 67200 tokens would be off by ~1e-5 relative).
  __m512d sum[2 * V];
  for (int v = 0; v < 2 * V; ++v) sum[v] = _mm512_setzero_pd();
  __m512 k[V];
  for (int64_t n = 0; n < tokens; ++n) {
    load_key<D>(keys, n, token_stride, rope, first_row, k);
    for (int v = 0; v < V; ++v) {
      sum[2 * v] = _mm512_add_pd(sum[2 * v], _mm512_cvtps_pd(_mm512_castps512_ps256(k[v])));
      sum[2 * v + 1] = _mm512_add_pd(sum[2 * v + 1], _mm512_cvtps_pd(_mm512_extractf32x8_ps(k[v], 1)));
    }
  }
  __m512 centre[V];
  for (int v = 0; v < V; ++v)
    centre[v] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(sum[2 * v])),
                                   _mm512_cvtpd_ps(sum[2 * v + 1]), 1);
  for (int64_t n = 0; n < tokens; ++n) {
    load_key<D>(keys, n, token_stride, rope, first_row, k);
    __m512 dot = _mm512_setzero_ps(), square = _mm512_setzero_ps();
    for (int v = 0; v < V; ++v) {
      dot = _mm512_fmadd_ps(k[v], centre[v], dot);
      square = _mm512_fmadd_ps(k[v], k[v], square);
    }
    const float norm = std::max(std::sqrt(_mm512_reduce_add_ps(square)), 1e-12f);
    out[n] = order_preserving_bits(_mm512_reduce_add_ps(dot) / norm);
  }
}

// Token indices of `keys` in ascending order (stable), written to `order`; `spare_keys` and `spare_index`
// are scratch space of the same length.
void radix_argsort(uint32_t* keys, uint32_t* spare_keys, uint32_t* index, uint32_t* spare_index, int64_t count,
                   int64_t* order) {
  for (int64_t n = 0; n < count; ++n) index[n] = static_cast<uint32_t>(n);
  for (int shift = 0; shift < 32; shift += 8) {
    int64_t start[257] = {0};
    for (int64_t n = 0; n < count; ++n) ++start[((keys[n] >> shift) & 0xFF) + 1];
    if (start[((keys[0] >> shift) & 0xFF) + 1] == count) continue;  // one digit value: nothing moves
    for (int digit = 0; digit < 256; ++digit) start[digit + 1] += start[digit];
    for (int64_t n = 0; n < count; ++n) {
      const int64_t slot = start[(keys[n] >> shift) & 0xFF]++;
      spare_keys[slot] = keys[n];
      spare_index[slot] = index[n];
    }
    std::swap(keys, spare_keys);
    std::swap(index, spare_index);
  }
  for (int64_t n = 0; n < count; ++n) order[n] = index[n];
}

#pragma GCC pop_options
#endif  // MMSECVIT_AVX512

}  // namespace

at::Tensor semantic_order(const at::Tensor& rows, int64_t batch, int64_t tokens, int64_t heads,
                          const c10::optional<at::Tensor>& rope_axes, int64_t height, int64_t width) {
  TORCH_CHECK(cpu_supported(), "mmsecvit ranking kernel: this CPU lacks AVX-512 (avx512f, avx512dq)");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 2 && rows.is_contiguous(),
              "rows must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(rows.size(1) == 48 || rows.size(1) == 96, "rows must hold q, k, v of head_dim 16 or 32, got ",
              rows.size(1), " values per row");
  TORCH_CHECK(batch >= 1 && tokens >= 1 && heads >= 1 && rows.size(0) == batch * tokens * heads,
              "rows must have batch * tokens * heads rows, got ", rows.size(0), " for ", batch, " x ", tokens, " x ",
              heads);
  TORCH_CHECK(tokens < (int64_t{1} << 32), "at most 2^32 - 1 tokens per image");
  TORCH_CHECK(!rope_axes.has_value() || height * width == tokens, "rope: height * width must be the token count, got ",
              height, " x ", width, " for ", tokens, " tokens");
  auto order = at::empty({batch, heads, tokens}, rows.options().dtype(at::kLong));
#ifdef MMSECVIT_AVX512
  const Rope rope = make_rope(rope_axes, heads, height, width, 1.0, rows);
  const int64_t head_dim = rows.size(1) / 3;
  const float* data = rows.data_ptr<float>();
  int64_t* out = order.data_ptr<int64_t>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> scratch(4 * tokens);
    uint32_t* keys = scratch.data();
    for (int64_t group = begin; group < end; ++group) {
      const int64_t b = group / heads, h = group % heads;
      // k of token n of this (image, head) is at row (b * tokens + n) * heads + h, after q.
      const float* first_key = data + ((b * tokens) * heads + h) * 3 * head_dim + head_dim;
      const int64_t token_stride = heads * 3 * head_dim;
      const int64_t first_row = b * tokens * heads + h;
      if (head_dim == 16) score_keys<16>(first_key, tokens, token_stride, rope, first_row, keys);
      else score_keys<32>(first_key, tokens, token_stride, rope, first_row, keys);
      radix_argsort(keys, keys + tokens, keys + 2 * tokens, keys + 3 * tokens, tokens, out + group * tokens);
    }
  });
#endif
  return order;
}

}  // namespace mmsecvit
