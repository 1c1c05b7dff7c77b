// Ranking of SEC attention: per image and head, the tokens in ascending order of the cosine similarity of
// their key to the keys' sum (the centre; its length does not change the order).
//
// `rows` is (B * N * heads, 3 * D), one row per (image, token, head) holding q, k and v, as for the cluster
// attention kernel. One thread ranks one (image, head): a pass over the keys sums them, a second scores
// every token, and a stable least-significant-digit radix sort of order-preserving 32-bit keys (four
// passes of 8 bits) ranks the scores. Equal scores keep token order, as PyTorch's stable sort does.
//
// The sums are in float64, in an order fixed by the code rather than by the vector width: the centre
// channel by channel over the tokens in order, each score's dot product and squared norm over the channels
// (their float32 products are exact in float64). So the AVX-512 and AVX2 builds give identical rankings,
// and PyTorch's float64 computation of the same scores ((k.double() @ centre.double()) / norm) agrees
// with them up to float64 rounding, far below the float32 rounding of the scores.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "rotary.h"
#include "simd.h"

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {
namespace {

// Unsigned integers that order like the floats (negative floats reversed, then the sign bit flipped).
inline uint32_t order_preserving_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Calls visit(n, k) for every token n in order with its key k (D values), rotated when `rope` is enabled
// (token n is then at (n / width, n % width); its scale does not change the ranking). The rotation is
// elementwise, so both builds give the same floats.
template <int D, class Visit>
inline void for_each_key(const float* keys, int64_t tokens, int64_t token_stride, const Rope& rope,
                         Visit&& visit) {
  constexpr int V = D / simd::kLanes;
  constexpr int64_t kAhead = 16;  // tokens between a key's prefetch and its use
  float rotated[D];
  int64_t y = 0, x = 0;
  for (int64_t n = 0; n < tokens; ++n) {
    const float* k = keys + n * token_stride;
    // The keys are a row group apart (heads * 3 * D floats): requests ahead keep several misses in flight.
    if (n + kAhead < tokens) {
      const char* ahead = reinterpret_cast<const char*>(k + kAhead * token_stride);
      _mm_prefetch(ahead, _MM_HINT_T0);
      _mm_prefetch(ahead + D * sizeof(float) - 1, _MM_HINT_T0);
    }
    if (rope.enabled()) {
      simd::Vec cos[V], sin[V];
      rotation_at<D>(rope, y, x, cos, sin);
      for (int v = 0; v < V; ++v)
        simd::store(rotated + v * simd::kLanes, rotate(simd::load(k + v * simd::kLanes), cos[v], sin[v]));
      k = rotated;
      if (++x == rope.width) {
        x = 0;
        ++y;
      }
    }
    visit(n, k);
  }
}

// Four float64 lanes (a GCC / Clang vector type): the same four sums in both builds, whatever their width.
typedef double Double4 __attribute__((vector_size(4 * sizeof(double))));

// Scores of one (image, head): dot(k_n, centre) / max(|k_n|, 1e-12) for every token n, as sortable keys.
template <int D>
void score_keys(const float* keys, int64_t tokens, int64_t token_stride, const Rope& rope, uint32_t* out) {
  // The keys' sum in float64 (a float32 running sum over 67200 tokens would be off by ~1e-5 relative).
  double sum[D] = {};
  for_each_key<D>(keys, tokens, token_stride, rope, [&](int64_t, const float* k) {
    for (int c = 0; c < D; ++c) sum[c] += k[c];
  });
  Double4 centre[D / 4];  // the sum rounded to float32, channels 4 i .. 4 i + 3 in centre[i]
  for (int i = 0; i < D / 4; ++i)
    for (int l = 0; l < 4; ++l) centre[i][l] = static_cast<float>(sum[4 * i + l]);
  for_each_key<D>(keys, tokens, token_stride, rope, [&](int64_t n, const float* k) {
    // Lane l sums channels l, 4 + l, 8 + l, ... in order; the lanes are then added in a fixed order.
    Double4 dot = {}, square = {};
    for (int i = 0; i < D / 4; ++i) {
      const Double4 value = {k[4 * i], k[4 * i + 1], k[4 * i + 2], k[4 * i + 3]};
      dot += value * centre[i];
      square += value * value;
    }
    const double norm = std::sqrt((square[0] + square[1]) + (square[2] + square[3]));
    const double score = ((dot[0] + dot[1]) + (dot[2] + dot[3])) / std::max(norm, 1e-12);
    out[n] = order_preserving_bits(static_cast<float>(score));
  });
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

}  // namespace

at::Tensor semantic_order(const at::Tensor& rows, int64_t batch, int64_t tokens, int64_t heads,
                          const c10::optional<at::Tensor>& rope_axes, int64_t height, int64_t width) {
  check_cpu_supported("ranking");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 2 && rows.is_contiguous(),
              "rows must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(rows.size(1) == 48 || rows.size(1) == 96, "rows must hold q, k, v of head_dim 16 or 32, got ",
              rows.size(1), " values per row");
  TORCH_CHECK(batch >= 0 && tokens >= 1 && heads >= 1 && rows.size(0) == batch * tokens * heads,
              "rows must have batch * tokens * heads rows, got ", rows.size(0), " for ", batch, " x ", tokens, " x ",
              heads);
  TORCH_CHECK(tokens < (int64_t{1} << 32), "at most 2^32 - 1 tokens per image");
  TORCH_CHECK(!rope_axes.has_value() || height * width == tokens, "rope: height * width must be the token count, got ",
              height, " x ", width, " for ", tokens, " tokens");
  const Rope rope = make_rope(rope_axes, heads, height, width, 1.0, rows);
  auto order = at::empty({batch, heads, tokens}, rows.options().dtype(at::kLong));
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
      if (head_dim == 16) score_keys<16>(first_key, tokens, token_stride, rope, keys);
      else score_keys<32>(first_key, tokens, token_stride, rope, keys);
      radix_argsort(keys, keys + tokens, keys + 2 * tokens, keys + 3 * tokens, tokens, out + group * tokens);
    }
  });
  return order;
}

}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
