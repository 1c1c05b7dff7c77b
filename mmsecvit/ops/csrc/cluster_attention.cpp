// Fused SEC cluster attention for the CPU (float32, simd.h's vectors: AVX-512 or AVX2).
//
// The tokens of every cluster are gathered straight from the packed q/k/v rows through the cluster order,
// the cluster's scores, softmax and weighted sum stay in per-thread buffers of cache size, and every result
// row is written straight to its place in the original token order. This replaces the permutation of all
// rows into cluster order, the batched matrix products and softmax over chunks of clusters, and the
// permutation back, with their passes over memory and their intermediate tensors.
//
// Layout: `rows` is (R, 3 * D), one row per (image, token, head) holding q, k (carrying the softmax scale)
// and v; or q and k before the rotary embedding and the scale, which the kernels then apply to each cluster's
// copy of the rows (rotary.h) and, in backward, take back out of the q and k gradients. `sources` lists the
// rows of each cluster one cluster after another; `parts` is a flat list of (first slot, cluster count,
// cluster length) triples. The output of the forward is (R, D); the backward
// returns the gradient of `rows`. Each row belongs to exactly one cluster, so clusters run in parallel
// without any two threads writing the same row.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rotary.h"
#include "simd.h"
#include "vector_math.h"

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {
namespace {

using simd::kLanes;
using simd::Vec;

constexpr int kMaxCluster = 256;  // longer clusters (global attention) are left to PyTorch's fused kernel

// Register tiles: sums and operands within the 32 zmm (AVX-512) or 16 ymm (AVX2) registers.
constexpr int kProductRows = 3;  // row_products: rows of A per tile
constexpr int kProductVectors = kLanes == 16 ? 7 : 3;  // its column vectors (AVX2: 3 x 4 spills, 20-30% slower)
// weighted_sums: rows per tile, D / kLanes sums each (D = 32: 28 zmm, 98 = 7 x 14; AVX2: 3 rows spill, 30% slower).
template <int D>
constexpr int kSumRows = kLanes == 16 ? (D == 32 ? 14 : 8) : (D == 32 ? 2 : 6);

// out[r][j] = a[r] . bt[:, j] for kProductRows rows and NJ vectors of columns; bt is (D, ld) (a transposed
// matrix).
template <int D, int NJ>
inline void row_products_tile(const float* const* a, int rows, const float* bt, int ld, float* out) {
  Vec acc[kProductRows][NJ];
  for (int r = 0; r < kProductRows; ++r)
    for (int t = 0; t < NJ; ++t) acc[r][t] = simd::zero();
  for (int c = 0; c < D; ++c) {
    Vec b[NJ];
    for (int t = 0; t < NJ; ++t) b[t] = simd::load(bt + c * ld + t * kLanes);
    for (int r = 0; r < kProductRows; ++r) {
      const Vec x = simd::set1(a[r][c]);
      for (int t = 0; t < NJ; ++t) acc[r][t] = simd::fmadd(x, b[t], acc[r][t]);
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < NJ; ++t) simd::store(out + r * ld + t * kLanes, acc[r][t]);
}

// The tile of row_products at column vector j, `vectors` (at most NJ) vectors wide.
template <int D, int NJ>
inline void row_products_columns(const float* const* a, int rows, const float* bt, int ld, int j, int vectors,
                                 float* out) {
  if constexpr (NJ > 1)
    if (vectors < NJ) return row_products_columns<D, NJ - 1>(a, rows, bt, ld, j, vectors, out);
  row_products_tile<D, NJ>(a, rows, bt + j * kLanes, ld, out + j * kLanes);
}

// out (L, ld) = A B^T, where row i of A is a[i] (D values) and bt = B^T is (D, ld), ld = L rounded up to
// kLanes.
template <int D>
void row_products(const float* const* a, int length, const float* bt, int ld, float* out) {
  const int vectors = ld / kLanes;
  for (int i = 0; i < length; i += kProductRows) {
    const float* tile_rows[kProductRows];
    const int rows = std::min(kProductRows, length - i);
    for (int r = 0; r < kProductRows; ++r) tile_rows[r] = a[i + std::min(r, rows - 1)];
    for (int j = 0; j < vectors; j += kProductVectors)
      row_products_columns<D, kProductVectors>(tile_rows, rows, bt, ld, j, std::min(kProductVectors, vectors - j),
                                               out + i * ld);
  }
}

// Whether rows of `width` floats from `base` are whole 64-byte lines, which streaming stores can write past
// the cache. The kernels' outputs are written once, in rows scattered over maps larger than the cache:
// streaming them saves reading each line in first (attention backward of a 4200-token map: 8% less time).
inline bool streamable(const float* base, int64_t width) {
  return reinterpret_cast<uintptr_t>(base) % 64 == 0 && width % 16 == 0;
}

inline void store(float* dst, Vec value, bool stream) {
  if (stream) simd::stream(dst, value);
  else simd::store(dst, value);
}

// Where weighted sums go: row i of a cluster to base + (idx ? idx[i] : i) * stride, times scale[i] when
// given, with streaming stores when `stream` (see streamable).
struct RowsOut {
  float* base;
  int64_t stride;
  const int64_t* idx = nullptr;
  const float* scale = nullptr;
  bool stream = false;

  float* row(int i) const { return base + (idx ? idx[i] : i) * stride; }
};

// Rows first .. first + NR - 1 of P V, where P(r, j) is p[r * row_step + j * col_step] (col_step = 1 for
// P V, row_step = 1 for P^T V) and v is (length, D).
template <int D, int NR>
inline void weighted_sum_tile(const float* p, int row_step, int col_step, const float* v, int length, int first,
                              const RowsOut& out) {
  constexpr int NV = D / kLanes;
  Vec acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NV; ++t) acc[r][t] = simd::zero();
  for (int j = 0; j < length; ++j) {
    Vec b[NV];
    for (int t = 0; t < NV; ++t) b[t] = simd::load(v + j * D + t * kLanes);
    const float* pj = p + first * row_step + j * col_step;
    for (int r = 0; r < NR; ++r) {
      const Vec x = simd::set1(pj[r * row_step]);
      for (int t = 0; t < NV; ++t) acc[r][t] = simd::fmadd(x, b[t], acc[r][t]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    float* dst = out.row(first + r);
    const Vec s = simd::set1(out.scale ? out.scale[first + r] : 1.0f);
    for (int t = 0; t < NV; ++t) store(dst + t * kLanes, simd::mul(acc[r][t], s), out.stream);
  }
}

// Rows [*first, length) of P V in tiles of NR rows while they fill one, then of fewer rows.
template <int D, int NR>
inline void weighted_sum_rows(const float* p, int row_step, int col_step, const float* v, int length, int* first,
                              const RowsOut& out) {
  for (; *first + NR <= length; *first += NR)
    weighted_sum_tile<D, NR>(p, row_step, col_step, v, length, *first, out);
  if constexpr (NR > 1) weighted_sum_rows<D, NR / 2>(p, row_step, col_step, v, length, first, out);
}

// P V for the (length, ld) matrix p, or for its transpose when `transposed`.
template <int D>
void weighted_sums(const float* p, int ld, bool transposed, const float* v, int length, const RowsOut& out) {
  const int row_step = transposed ? 1 : ld, col_step = transposed ? ld : 1;
  int first = 0;
  weighted_sum_rows<D, kSumRows<D>>(p, row_step, col_step, v, length, &first, out);
}

// Rows of s (length, ld) become exp(s - row max), zero past `length`; returns 1 / row sum in inv_sum.
void softmax_numerators(float* s, int length, int ld, float* inv_sum) {
  const int vectors = ld / kLanes;
  const int last = length - (vectors - 1) * kLanes;  // columns in the last vector
  const Vec minus_infinity = simd::set1(-INFINITY);
  for (int i = 0; i < length; ++i) {
    float* row = s + i * ld;
    Vec m = simd::keep_first(simd::load(row + (vectors - 1) * kLanes), last, minus_infinity);
    for (int t = 0; t < vectors - 1; ++t) m = simd::max(m, simd::load(row + t * kLanes));
    const Vec shift = simd::set1(simd::max_lanes(m) * kLog2e);
    Vec sum = simd::zero();
    for (int t = 0; t < vectors; ++t) {
      Vec e = pow2(simd::fmsub(simd::load(row + t * kLanes), simd::set1(kLog2e), shift));
      if (t == vectors - 1) e = simd::keep_first(e, last, simd::zero());
      simd::store(row + t * kLanes, e);
      sum = simd::add(sum, e);
    }
    inv_sum[i] = 1.0f / simd::sum_lanes(sum);
  }
}

// Per-thread buffers for clusters of `length` tokens (ld = length rounded up to kLanes); the backward's only
// when asked for.
struct Workspace {
  Workspace(int d, int length, int ld, bool backward)
      : cluster(length * 3 * d), kt(d * ld), v(length * d), s(length * ld), inv_sum(length), row_ptrs(length) {
    if (backward) {
      vt.resize(d * ld);
      q.resize(length * d);
      k.resize(length * d);
      dout.resize(length * d);
      ds.resize(length * ld);
      grad_ptrs.resize(length);
    }
  }
  std::vector<float> cluster, kt, v, s, inv_sum, vt, q, k, dout, ds;
  std::vector<const float*> row_ptrs, grad_ptrs;
};

template <int D>
void gather_rows(const float* rows, int64_t stride, const int64_t* idx, int length, int offset, float* out) {
  for (int j = 0; j < length; ++j) std::memcpy(out + j * D, rows + idx[j] * stride + offset, D * sizeof(float));
}

// Column block [offset, offset + D) of the cluster's (length, 3 * D) rows, as (D, ld) with zero padding past
// `length`, in kLanes x kLanes blocks.
template <int D>
void transpose_block(const float* cluster, int length, int ld, int offset, float* out) {
  for (int j0 = 0; j0 < ld; j0 += kLanes)
    for (int c0 = 0; c0 < D; c0 += kLanes) {
      Vec block[kLanes];
      for (int j = 0; j < kLanes; ++j)
        block[j] = j0 + j < length ? simd::load(cluster + (j0 + j) * 3 * D + offset + c0) : simd::zero();
      simd::transpose(block);
      for (int c = 0; c < kLanes; ++c) simd::store(out + (c0 + c) * ld + j0, block[c]);
    }
}

// Column block [offset, offset + D) of the cluster's (length, 3 * D) rows, as (length, D).
template <int D>
void copy_block(const float* cluster, int length, int offset, float* out) {
  for (int j = 0; j < length; ++j) std::memcpy(out + j * D, cluster + j * 3 * D + offset, D * sizeof(float));
}

// Bring the next cluster's rows into L2 while the current one computes (their order is random). Not into
// L1: a cluster's rows (38 KB for 98 tokens of head_dim 32, 50 KB with the output gradient) would evict
// the current cluster's buffers (prefetching into L1 took 8-10% longer).
void prefetch_rows(const float* rows, int64_t stride, const int64_t* idx, int length) {
  for (int j = 0; j < length; ++j) {
    const char* row = reinterpret_cast<const char*>(rows + idx[j] * stride);
    for (int64_t b = 0; b < stride * 4; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
  }
}

inline int padded_length(int length) { return (length + kLanes - 1) / kLanes * kLanes; }

template <int D>
void forward_clusters(const float* rows, const int64_t* sources, int64_t begin, int64_t end, int length,
                      const Rope& rope, float* out) {
  const int ld = padded_length(length);
  Workspace ws(D, length, ld, false);
  const bool stream = streamable(out, D);
  for (int64_t c = begin; c < end; ++c) {
    const int64_t* idx = sources + c * length;
    if (c + 1 < end) prefetch_rows(rows, 3 * D, idx + length, length);
    // The cluster's rows first, in one pass; every later read then hits this thread's cache. (Reading q
    // straight from the scattered rows during the products took up to 40% longer on maps beyond the cache.)
    gather_rows<3 * D>(rows, 3 * D, idx, length, 0, ws.cluster.data());
    if (rope.enabled())
      for (int j = 0; j < length; ++j) rotate_row<D>(rope, idx[j], ws.cluster.data() + j * 3 * D);
    for (int i = 0; i < length; ++i) ws.row_ptrs[i] = ws.cluster.data() + i * 3 * D;
    transpose_block<D>(ws.cluster.data(), length, ld, D, ws.kt.data());
    copy_block<D>(ws.cluster.data(), length, 2 * D, ws.v.data());
    row_products<D>(ws.row_ptrs.data(), length, ws.kt.data(), ld, ws.s.data());
    softmax_numerators(ws.s.data(), length, ld, ws.inv_sum.data());
    weighted_sums<D>(ws.s.data(), ld, false, ws.v.data(), length, {out, D, idx, ws.inv_sum.data(), stream});
  }
  _mm_sfence();
}

template <int D>
void backward_clusters(const float* rows, const float* grad_out, const int64_t* sources, int64_t begin,
                       int64_t end, int length, const Rope& rope, float* grad) {
  const int ld = padded_length(length);
  const int vectors = ld / kLanes;
  Workspace ws(D, length, ld, true);
  const bool stream = streamable(grad, 3 * D);
  for (int64_t c = begin; c < end; ++c) {
    const int64_t* idx = sources + c * length;
    if (c + 1 < end) {
      prefetch_rows(rows, 3 * D, idx + length, length);
      prefetch_rows(grad_out, D, idx + length, length);
    }
    gather_rows<3 * D>(rows, 3 * D, idx, length, 0, ws.cluster.data());
    gather_rows<D>(grad_out, D, idx, length, 0, ws.dout.data());
    if (rope.enabled())
      for (int j = 0; j < length; ++j) rotate_row<D>(rope, idx[j], ws.cluster.data() + j * 3 * D);
    transpose_block<D>(ws.cluster.data(), length, ld, D, ws.kt.data());
    transpose_block<D>(ws.cluster.data(), length, ld, 2 * D, ws.vt.data());
    copy_block<D>(ws.cluster.data(), length, 0, ws.q.data());
    copy_block<D>(ws.cluster.data(), length, D, ws.k.data());
    for (int i = 0; i < length; ++i) {
      ws.row_ptrs[i] = ws.q.data() + i * D;
      ws.grad_ptrs[i] = ws.dout.data() + i * D;
    }
    // Probabilities P, and dP = dO V^T.
    row_products<D>(ws.row_ptrs.data(), length, ws.kt.data(), ld, ws.s.data());
    softmax_numerators(ws.s.data(), length, ld, ws.inv_sum.data());
    row_products<D>(ws.grad_ptrs.data(), length, ws.vt.data(), ld, ws.ds.data());
    // dS = P * (dP - sum_j P dP), in place of dP; P normalised in place.
    for (int i = 0; i < length; ++i) {
      float* p = ws.s.data() + i * ld;
      float* dp = ws.ds.data() + i * ld;
      const Vec inv = simd::set1(ws.inv_sum[i]);
      Vec dot = simd::zero();
      for (int t = 0; t < vectors; ++t) {
        const Vec pv = simd::mul(simd::load(p + t * kLanes), inv);
        simd::store(p + t * kLanes, pv);
        dot = simd::fmadd(pv, simd::load(dp + t * kLanes), dot);
      }
      const Vec row_dot = simd::set1(simd::sum_lanes(dot));
      for (int t = 0; t < vectors; ++t) {
        const Vec pv = simd::load(p + t * kLanes);
        simd::store(dp + t * kLanes, simd::mul(pv, simd::sub(simd::load(dp + t * kLanes), row_dot)));
      }
    }
    // dQ = dS K, dK = dS^T Q, dV = P^T dO into the cluster's rows, whole rows then written to their places.
    float* cluster_grad = ws.cluster.data();
    weighted_sums<D>(ws.ds.data(), ld, false, ws.k.data(), length, {cluster_grad, 3 * D});
    weighted_sums<D>(ws.ds.data(), ld, true, ws.q.data(), length, {cluster_grad + D, 3 * D});
    weighted_sums<D>(ws.s.data(), ld, true, ws.dout.data(), length, {cluster_grad + 2 * D, 3 * D});
    for (int j = 0; j < length; ++j) {
      if (rope.enabled()) rotate_row<D>(rope, idx[j], cluster_grad + j * 3 * D, true);
      for (int t = 0; t < 3 * D; t += kLanes)
        store(grad + idx[j] * 3 * D + t, simd::load(cluster_grad + j * 3 * D + t), stream);
    }
  }
  _mm_sfence();
}

struct Part {
  int64_t first, count, length;
};

std::vector<Part> check_inputs(const at::Tensor& rows, const at::Tensor& sources,
                               const std::vector<int64_t>& parts) {
  check_cpu_supported("cluster attention");
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kFloat && rows.dim() == 2 &&
                  rows.is_contiguous(),
              "rows must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(rows.size(1) == 48 || rows.size(1) == 96, "rows must hold q, k, v of head_dim 16 or 32, got ",
              rows.size(1), " values per row");
  TORCH_CHECK(sources.device().is_cpu() && sources.scalar_type() == at::kLong && sources.dim() == 1 &&
                  sources.is_contiguous() && sources.size(0) == rows.size(0),
              "sources must be a contiguous int64 CPU tensor with one entry per row");
  const int64_t* source = sources.data_ptr<int64_t>();
  const int64_t count = rows.size(0);
  TORCH_CHECK(std::all_of(source, source + count, [count](int64_t row) { return row >= 0 && row < count; }),
              "sources must be row indices in [0, ", count, ")");
  TORCH_CHECK(parts.size() % 3 == 0, "parts must be (first slot, cluster count, cluster length) triples");
  std::vector<Part> out;
  int64_t next = 0;  // parts follow each other and together cover every slot
  for (size_t i = 0; i < parts.size(); i += 3) {
    const Part part{parts[i], parts[i + 1], parts[i + 2]};
    TORCH_CHECK(part.length >= 1 && part.length <= kMaxCluster, "cluster length must be in [1, ", kMaxCluster,
                "], got ", part.length);
    TORCH_CHECK(part.first == next && part.count >= 0, "parts must follow each other from slot 0");
    next = part.first + part.count * part.length;
    TORCH_CHECK(next <= rows.size(0), "clusters run past the rows");
    out.push_back(part);
  }
  TORCH_CHECK(next == rows.size(0), "clusters must cover every row, got ", next, " of ", rows.size(0));
  return out;
}

}  // namespace

at::Tensor cluster_attention_forward(const at::Tensor& rows, const at::Tensor& sources,
                                     const std::vector<int64_t>& parts, const c10::optional<at::Tensor>& rope_axes,
                                     int64_t heads, int64_t height, int64_t width, double key_scale) {
  const auto checked = check_inputs(rows, sources, parts);
  const Rope rope = make_rope(rope_axes, heads, height, width, key_scale, rows);
  const int64_t d = rows.size(1) / 3;
  auto out = at::empty({rows.size(0), d}, rows.options());
  const float* row_data = rows.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  for (const Part& part : checked) {
    const int64_t* idx = sources.data_ptr<int64_t>() + part.first;
    at::parallel_for(0, part.count, 1, [&](int64_t begin, int64_t end) {
      if (d == 32) forward_clusters<32>(row_data, idx, begin, end, part.length, rope, out_data);
      else forward_clusters<16>(row_data, idx, begin, end, part.length, rope, out_data);
    });
  }
  return out;
}

at::Tensor cluster_attention_backward(const at::Tensor& rows, const at::Tensor& sources,
                                      const std::vector<int64_t>& parts, const at::Tensor& grad_out,
                                      const c10::optional<at::Tensor>& rope_axes, int64_t heads, int64_t height,
                                      int64_t width, double key_scale) {
  const auto checked = check_inputs(rows, sources, parts);
  const Rope rope = make_rope(rope_axes, heads, height, width, key_scale, rows);
  const int64_t d = rows.size(1) / 3;
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous() &&
                  grad_out.numel() == rows.size(0) * d,
              "grad_out must be a contiguous float32 CPU tensor with head_dim values per row");
  auto grad = at::empty_like(rows);
  const float* row_data = rows.data_ptr<float>();
  const float* grad_out_data = grad_out.data_ptr<float>();
  float* grad_data = grad.data_ptr<float>();
  for (const Part& part : checked) {
    const int64_t* idx = sources.data_ptr<int64_t>() + part.first;
    at::parallel_for(0, part.count, 1, [&](int64_t begin, int64_t end) {
      if (d == 32) backward_clusters<32>(row_data, grad_out_data, idx, begin, end, part.length, rope, grad_data);
      else backward_clusters<16>(row_data, grad_out_data, idx, begin, end, part.length, rope, grad_data);
    });
  }
  return grad;
}

}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
