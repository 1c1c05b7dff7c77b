// Stride-1, zero-padded ("same") depthwise convolution of (B, H, W, C) tensors (3x3 and 5x5 kernels),
// forward and backward, optionally of the exact GELU of the input (the FFN's GELU and depthwise conv as one
// pass over memory).
//
// out[b, y, x, c] = bias[c] + sum over (i, j) of weight[c, i, j] * a(input[b, y + i - p, x + j - p, c]),
// with a the identity or GELU and p = k // 2. The backward gives, in one pass over the input and the output
// gradient: the input gradient (the flipped-kernel convolution of the output gradient, times a' with GELU),
// the weight and bias gradients and, with GELU, the channel sums of the input gradient (the bias gradient of
// the layer that produced the input) and, on request, the forward's output again (its activated input rows
// are at hand), so a recomputing caller need not run the forward first.
//
// Every thread takes a band of output rows. The k input rows (after the activation) and, in the backward,
// the k gradient rows that a row needs are kept zero padded, in rings of row buffers: each value is read
// from memory and activated once, memory is read and written in order, and the inner loops need no border
// cases. Channels are padded to a multiple of the vector width inside the rings, so only the loads of
// input rows and the final stores of the last channels are masked.
// Per-thread weight gradients are summed per row, then over rows, then over threads in a fixed order (the
// result does not depend on scheduling).
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "simd.h"
#include "vector_math.h"

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {
namespace {

using simd::kLanes;
using simd::Vec;

// Register tiles within the 32 zmm (AVX-512) or 16 ymm (AVX2) registers.
// convolve: output positions per tile, T sums + T + K - 1 inputs + a tap (AVX2: 4 or 8 up to 20% slower).
template <int K>
constexpr int kPositionTile = kLanes == 16 ? 8 : (K == 3 ? 6 : 5);
// weight_grad_rows: kernel rows per pass, K sums each (AVX2, K = 5: 5 rows spill, 40% slower; 1 or 3, 10%).
template <int K>
constexpr int kWeightGradRows = kLanes == 16 || K == 3 ? K : 2;

struct Geometry {
  int64_t batch, height, width, channels;
  int64_t padded_channels;  // channels rounded up to kLanes: the ring's floats per position
  int kernel_size;
};

// A (B, H, W, C) float tensor with contiguous channels and any other strides.
struct Map {
  const float* data;
  int64_t image, row, position;

  const float* row_ptr(int64_t b, int64_t y) const { return data + b * image + y * row; }
};

// K image rows, zero padded by P positions on each side and to `padded_channels`, each in the slot of its
// index modulo K; rows outside the image read as zeros.
class RowRing {
 public:
  RowRing(const Geometry& g, int pad)
      : g_(g), pad_(pad), stride_((g.width + 2 * pad) * g.padded_channels),
        data_(new float[(g.kernel_size + 1) * stride_]), held_(g.kernel_size, -1) {
    // Only the padding is zeroed here: every fill overwrites a slot's other positions (padded channels
    // included). On small maps zeroing whole slots cost more than the convolution.
    const int64_t border = pad * g.padded_channels;
    for (int slot = 0; slot < g.kernel_size; ++slot) {
      float* start = data_.get() + slot * stride_;
      std::fill(start, start + border, 0.0f);
      std::fill(start + stride_ - border, start + stride_, 0.0f);
    }
    std::fill(zero_row(), zero_row() + stride_, 0.0f);
  }

  // Row y of image b, filled by fill(buffer at the first real position) when the slot does not hold it.
  template <class Fill>
  const float* row(int64_t b, int64_t y, Fill&& fill) {
    if (y < 0 || y >= g_.height) return zero_row();
    const int64_t key = b * g_.height + y;
    float* slot = slot_of(b, y);
    if (held_[key % g_.kernel_size] != key) {
      held_[key % g_.kernel_size] = key;
      fill(slot + pad_ * g_.padded_channels);
    }
    return slot;
  }

  // The slot for row y of image b.
  float* slot_of(int64_t b, int64_t y) { return data_.get() + ((b * g_.height + y) % g_.kernel_size) * stride_; }

 private:
  float* zero_row() { return data_.get() + g_.kernel_size * stride_; }

  Geometry g_;
  int pad_;
  int64_t stride_;
  std::unique_ptr<float[]> data_;
  std::vector<int64_t> held_;
};

// Channels of the block from c0 that hold values: kLanes but in the last block.
inline int lanes(int64_t channels, int64_t c0) { return static_cast<int>(std::min<int64_t>(kLanes, channels - c0)); }

// Copies one row (GELU applied when Gelu) into a ring slot; with `derivative`, also writes GELU's derivative
// at the same offsets of another slot.
template <bool Gelu>
void fill_row(const Geometry& g, const float* src, int64_t position, float* dst, float* derivative) {
  for (int64_t x = 0; x < g.width; ++x)
    for (int64_t c0 = 0; c0 < g.channels; c0 += kLanes) {
      const int n = lanes(g.channels, c0);
      const Vec v = n == kLanes ? simd::load(src + x * position + c0) : simd::load_first(src + x * position + c0, n);
      const int64_t at = x * g.padded_channels + c0;
      if (Gelu) {
        Vec d;
        simd::store(dst + at, gelu(v, derivative ? &d : nullptr));
        if (derivative) simd::store(derivative + at, d);
      } else {
        simd::store(dst + at, v);
      }
    }
}

// acc[t] += sum over (i, j) of taps[i * K + j] * rows[i][x + t + j] for kLanes channels from c0; rows are
// padded rows (position 0 is x = -P) and taps is (K * K, padded_channels).
template <int K, int T>
inline void convolve(const float* const* rows, int64_t x, int64_t c0, int64_t cp, const float* taps, Vec* acc) {
#pragma GCC unroll 5
  for (int i = 0; i < K; ++i) {
    const float* src = rows[i] + x * cp + c0;
    Vec in[T + K - 1];
#pragma GCC unroll 16
    for (int u = 0; u < T + K - 1; ++u) in[u] = simd::load(src + u * cp);
#pragma GCC unroll 5
    for (int j = 0; j < K; ++j) {
      const Vec w = simd::load(taps + (i * K + j) * cp + c0);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[t] = simd::fmadd(w, in[t + j], acc[t]);
    }
  }
}

// Positions x .. x + T - 1 of one output row from K padded rows: bias plus the convolution, or, with `scale`
// (a padded row), the convolution times scale, whose channel sums are added to `sums`.
template <int K, int T>
inline void row_tile(const Geometry& g, const float* const* rows, const float* taps, const float* bias,
                     const float* scale, float* sums, int64_t x, float* out_row) {
  constexpr int P = K / 2;
  const int64_t cp = g.padded_channels;
  for (int64_t c0 = 0; c0 < cp; c0 += kLanes) {
    Vec acc[T];
    const Vec init = bias ? simd::load(bias + c0) : simd::zero();
    for (int t = 0; t < T; ++t) acc[t] = init;
    convolve<K, T>(rows, x, c0, cp, taps, acc);
    const int n = lanes(g.channels, c0);
    Vec total = simd::zero();
    for (int t = 0; t < T; ++t) {
      if (scale) {
        acc[t] = simd::mul(acc[t], simd::load(scale + (x + t + P) * cp + c0));
        total = simd::add(total, acc[t]);
      }
      float* dst = out_row + (x + t) * g.channels + c0;
      if (n == kLanes) simd::store(dst, acc[t]);
      else simd::store_first(dst, acc[t], n);
    }
    if (scale) simd::store(sums + c0, simd::add(simd::load(sums + c0), total));
  }
}

template <int K>
void output_row(const Geometry& g, const float* const* rows, const float* taps, const float* bias,
                const float* scale, float* sums, float* out_row) {
  constexpr int T = kPositionTile<K>;
  int64_t x = 0;
  for (; x + T <= g.width; x += T) row_tile<K, T>(g, rows, taps, bias, scale, sums, x, out_row);
  for (; x < g.width; ++x) row_tile<K, 1>(g, rows, taps, bias, scale, sums, x, out_row);
}

// weight_sums[(i * K + j) * cp + c] += sum over x of grad[x, c] * rows[i][x + j, c] for the kLanes channels
// from c0 and kernel rows i in [I, I + N), and with I = 0 also bias_sums[c] += sum over x of grad[x, c];
// grad is a padded row. The N * K sums stay in registers over the whole row.
template <int K, int I, int N>
inline void weight_grad_rows(const Geometry& g, const float* const* rows, const float* grad, int64_t c0,
                             float* weight_sums, float* bias_sums) {
  constexpr int P = K / 2;
  const int64_t cp = g.padded_channels;
  Vec acc[N * K];
  for (int t = 0; t < N * K; ++t) acc[t] = simd::zero();
  Vec bias_acc = simd::zero();
  for (int64_t x = 0; x < g.width; ++x) {
    const Vec gv = simd::load(grad + (x + P) * cp + c0);
    if constexpr (I == 0) bias_acc = simd::add(bias_acc, gv);
#pragma GCC unroll 5
    for (int i = 0; i < N; ++i)
#pragma GCC unroll 5
      for (int j = 0; j < K; ++j)
        acc[i * K + j] = simd::fmadd(gv, simd::load(rows[I + i] + (x + j) * cp + c0), acc[i * K + j]);
  }
  for (int t = 0; t < N * K; ++t) {
    float* sum = weight_sums + (I * K + t) * cp + c0;
    simd::store(sum, simd::add(simd::load(sum), acc[t]));
  }
  if constexpr (I == 0) simd::store(bias_sums + c0, simd::add(simd::load(bias_sums + c0), bias_acc));
  if constexpr (I + N < K)
    weight_grad_rows<K, I + N, std::min(N, K - I - N)>(g, rows, grad, c0, weight_sums, bias_sums);
}

// The weight and bias sums of weight_grad_rows for one row, all kernel rows, kWeightGradRows<K> at a time.
template <int K>
void weight_grad_row(const Geometry& g, const float* const* rows, const float* grad, float* weight_sums,
                     float* bias_sums) {
  for (int64_t c0 = 0; c0 < g.padded_channels; c0 += kLanes)
    weight_grad_rows<K, 0, kWeightGradRows<K>>(g, rows, grad, c0, weight_sums, bias_sums);
}

// The K rows y - P .. y + P of image b from a ring, filled from `map` (activated when Gelu; with
// `derivatives`, GELU's derivative goes to that ring's slots).
template <int K, bool Gelu>
void gather(const Geometry& g, const Map& map, RowRing& ring, int64_t b, int64_t y, const float** rows,
            RowRing* derivatives = nullptr) {
  constexpr int P = K / 2;
  for (int i = 0; i < K; ++i) {
    const int64_t src = y + i - P;
    rows[i] = ring.row(b, src, [&](float* dst) {
      float* derivative = derivatives ? derivatives->slot_of(b, src) + P * g.padded_channels : nullptr;
      fill_row<Gelu>(g, map.row_ptr(b, src), map.position, dst, derivative);
    });
  }
}

template <int K, bool Gelu>
void forward_rows(const Geometry& g, const Map& input, const float* taps, const float* bias, int64_t begin,
                  int64_t end, float* out) {
  RowRing ring(g, K / 2);
  const float* rows[K];
  for (int64_t r = begin; r < end; ++r) {
    gather<K, Gelu>(g, input, ring, r / g.height, r % g.height, rows);
    output_row<K>(g, rows, taps, bias, nullptr, nullptr, out + r * g.width * g.channels);
  }
}

// Per-thread sums of the backward: weight (K * K, cp), bias (cp), and input-gradient channel sums (cp).
struct GradSums {
  explicit GradSums(const Geometry& g)
      : weight(g.kernel_size * g.kernel_size * g.padded_channels, 0.0f), bias(g.padded_channels, 0.0f),
        input(g.padded_channels, 0.0f) {}

  // Adds `row` to these sums and zeroes it.
  void take(GradSums& row) {
    add_and_clear(weight, row.weight);
    add_and_clear(bias, row.bias);
    add_and_clear(input, row.input);
  }

  std::vector<float> weight, bias, input;

 private:
  static void add_and_clear(std::vector<float>& total, std::vector<float>& part) {
    for (size_t i = 0; i < total.size(); ++i) total[i] += part[i];
    std::fill(part.begin(), part.end(), 0.0f);
  }
};

// Backward of rows [begin, end); with `output`, also the forward's output rows (from the same activated rows).
template <int K, bool Gelu>
void backward_rows(const Geometry& g, const Map& input, const Map& grad, const float* flipped_taps, const float* taps,
                   const float* bias, int64_t begin, int64_t end, float* grad_input, float* output, GradSums& sums) {
  constexpr int P = K / 2;
  RowRing inputs(g, P), grads(g, P), derivatives(g, P);
  const float* rows[K];
  const float* grad_rows[K];
  GradSums row_sums(g);  // one row's sums, added to the band's after every row (small rounding error)
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / g.height, y = r % g.height;
    gather<K, Gelu>(g, input, inputs, b, y, rows, Gelu ? &derivatives : nullptr);
    gather<K, false>(g, grad, grads, b, y, grad_rows);
    weight_grad_row<K>(g, rows, grad_rows[P], row_sums.weight.data(), row_sums.bias.data());
    if (output) output_row<K>(g, rows, taps, bias, nullptr, nullptr, output + r * g.width * g.channels);
    if (grad_input)
      output_row<K>(g, grad_rows, flipped_taps, nullptr, Gelu ? derivatives.slot_of(b, y) : nullptr,
                    row_sums.input.data(), grad_input + r * g.width * g.channels);
    sums.take(row_sums);
  }
}

Geometry check_map(const at::Tensor& input, const char* name) {
  check_cpu_supported("depthwise");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4 &&
                  input.stride(3) == 1,
              name, " must be a (B, H, W, C) float32 CPU tensor with contiguous channels");
  return Geometry{input.size(0), input.size(1), input.size(2), input.size(3),
                  (input.size(3) + kLanes - 1) / kLanes * kLanes, 0};
}

// (K * K, padded channels) taps of a (C, 1, K, K) weight, zero in the padded channels; flipped in both
// spatial dims when `flip`.
at::Tensor taps_of(const at::Tensor& weight, Geometry& g, bool flip) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(0) == g.channels &&
                  weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "weight must be a float32 (C, 1, k, k) tensor with C = ", g.channels, ", got ", weight.sizes());
  const int64_t k = weight.size(2);
  TORCH_CHECK(k == 3 || k == 5, "kernel_size must be 3 or 5, got ", k);
  g.kernel_size = static_cast<int>(k);
  // Plain loops: on small maps a few tensor operations per call cost more than the convolution.
  const at::Tensor w = weight.contiguous();
  const float* src = w.data_ptr<float>();
  auto taps = at::empty({k * k, g.padded_channels}, weight.options());
  float* dst = taps.data_ptr<float>();
  for (int64_t tap = 0; tap < k * k; ++tap)
    for (int64_t c = 0; c < g.padded_channels; ++c)
      dst[tap * g.padded_channels + c] = c < g.channels ? src[c * k * k + (flip ? k * k - 1 - tap : tap)] : 0.0f;
  return taps;
}

void check_bias(const c10::optional<at::Tensor>& bias, const Geometry& g) {
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == g.channels),
              "bias must be a float32 tensor of ", g.channels, " values");
}

at::Tensor padded(const at::Tensor& values, int64_t size) {
  const at::Tensor contiguous = values.contiguous();
  const float* src = contiguous.data_ptr<float>();
  auto out = at::empty({size}, values.options());
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < size; ++i) dst[i] = i < values.size(0) ? src[i] : 0.0f;
  return out;
}

Map map_of(const at::Tensor& t) { return Map{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

at::Tensor depthwise_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             bool gelu_input) {
  Geometry g = check_map(input, "input");
  const at::Tensor taps = taps_of(weight, g, false);
  check_bias(bias, g);
  auto output = at::empty({g.batch, g.height, g.width, g.channels}, input.options());
  const at::Tensor bias_values = bias ? padded(*bias, g.padded_channels) : at::Tensor();
  const Map map = map_of(input);
  const float* tap_values = taps.data_ptr<float>();
  const float* bias_ptr = bias ? bias_values.data_ptr<float>() : nullptr;
  float* out = output.data_ptr<float>();
  // Bands of at least ~32K outputs, so small maps do not pay for threads they cannot use.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.width * g.channels));
  at::parallel_for(0, g.batch * g.height, grain, [&](int64_t begin, int64_t end) {
    if (g.kernel_size == 3) {
      if (gelu_input) forward_rows<3, true>(g, map, tap_values, bias_ptr, begin, end, out);
      else forward_rows<3, false>(g, map, tap_values, bias_ptr, begin, end, out);
    } else {
      if (gelu_input) forward_rows<5, true>(g, map, tap_values, bias_ptr, begin, end, out);
      else forward_rows<5, false>(g, map, tap_values, bias_ptr, begin, end, out);
    }
  });
  return output;
}

std::vector<at::Tensor> depthwise_backward(const at::Tensor& input, const at::Tensor& grad_output,
                                           const at::Tensor& weight, bool gelu_input, bool input_grad,
                                           const c10::optional<at::Tensor>& bias, bool with_output) {
  Geometry g = check_map(input, "input");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == at::kFloat &&
                  grad_output.stride(3) == 1,
              "grad_output must be a float32 tensor of the input's shape with contiguous channels");
  check_bias(bias, g);
  const at::Tensor flipped_taps = taps_of(weight, g, true);
  const at::Tensor taps = with_output ? taps_of(weight, g, false) : at::Tensor();
  const int64_t k = g.kernel_size;
  const auto shape = std::vector<int64_t>{g.batch, g.height, g.width, g.channels};
  auto grad_input = input_grad ? at::empty(shape, input.options()) : at::Tensor();
  auto output = with_output ? at::empty(shape, input.options()) : at::Tensor();
  auto weight_sums = at::zeros({k * k, g.padded_channels}, input.options());
  auto bias_sums = at::zeros({g.padded_channels}, input.options());
  auto input_sums = at::zeros({g.padded_channels}, input.options());
  const Map in = map_of(input), grad = map_of(grad_output);
  const float* flipped = flipped_taps.data_ptr<float>();
  const float* forward_taps = with_output ? taps.data_ptr<float>() : nullptr;
  const at::Tensor bias_values = bias && with_output ? padded(*bias, g.padded_channels) : at::Tensor();
  const float* bias_ptr = bias_values.defined() ? bias_values.data_ptr<float>() : nullptr;
  float* grad_in = input_grad ? grad_input.data_ptr<float>() : nullptr;
  float* out = with_output ? output.data_ptr<float>() : nullptr;
  // One band per thread (each keeps its own sums); the bands' sums are then added in band order.
  const int64_t rows = g.batch * g.height;
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / 4));
  std::vector<GradSums> band_sums(bands, GradSums(g));
  at::parallel_for(0, bands, 1, [&](int64_t first, int64_t last) {
    for (int64_t band = first; band < last; ++band) {
      const int64_t begin = rows * band / bands, end = rows * (band + 1) / bands;
      GradSums& sums = band_sums[band];
      const auto run = [&](auto rows) {
        rows(g, in, grad, flipped, forward_taps, bias_ptr, begin, end, grad_in, out, sums);
      };
      if (k == 3) {
        if (gelu_input) run(backward_rows<3, true>);
        else run(backward_rows<3, false>);
      } else {
        if (gelu_input) run(backward_rows<5, true>);
        else run(backward_rows<5, false>);
      }
    }
  });
  float* weight_total = weight_sums.data_ptr<float>();
  float* bias_total = bias_sums.data_ptr<float>();
  float* input_total = input_sums.data_ptr<float>();
  for (const GradSums& sums : band_sums) {
    for (size_t t = 0; t < sums.weight.size(); ++t) weight_total[t] += sums.weight[t];
    for (size_t c = 0; c < sums.bias.size(); ++c) bias_total[c] += sums.bias[c];
    for (size_t c = 0; c < sums.input.size(); ++c) input_total[c] += sums.input[c];
  }
  // (K * K, cp) sums to a (C, 1, K, K) weight gradient.
  auto grad_weight = weight_sums.narrow(1, 0, g.channels).t().reshape({g.channels, 1, k, k});
  return {grad_input, grad_weight, bias_sums.narrow(0, 0, g.channels),
          gelu_input && input_grad ? input_sums.narrow(0, 0, g.channels) : at::Tensor(), output};
}

}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
