// Stride-1, zero-padded ("same") depthwise convolution of (B, H, W, C) tensors (3x3 and 5x5 kernels).
//
// out[b, y, x, c] = bias[c] + sum over (i, j) of weight[c, i, j] * input[b, y + i - p, x + j - p, c].
// Meant for small maps, where oneDNN spends most of a call on its fixed cost (on large maps both are bound
// by memory bandwidth). Every thread takes whole output rows; for each tile of up to 8 positions and 16
// channels, each input row's T + k - 1 positions are loaded into registers once and serve all k taps of
// the tile, whose sums stay in registers until the output is written. The input may be a view with any
// row and position strides (channels contiguous), e.g. a slice of a wider tensor.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace mmsecvit {
namespace {

#ifdef MMSECVIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

struct Strides {
  int64_t image, row, position;  // of the input, in floats; channels are contiguous
};

template <bool Full>
inline __m512 load(__mmask16 mask, const float* p) {
  return Full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask, p);
}

// Output positions x .. x + T - 1 (all inside the borders when T > 1; a single border position has its taps
// clipped to the image), channels c0 .. c0 + 16 masked to `mask` unless Full. `taps` is (K * K, C), the
// weight transposed; rows[i] is input row y + i - P, valid for i in [first_i, last_i).
template <int K, int T, bool Full>
inline void tile(const float* const* rows, int first_i, int last_i, int64_t pos, const float* taps, const float* bias,
                 int64_t width, int64_t channels, int64_t x, int64_t c0, __mmask16 mask, float* out_row) {
  constexpr int P = K / 2;
  const __m512 b = bias ? load<Full>(mask, bias + c0) : _mm512_setzero_ps();
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = b;
  for (int i = first_i; i < last_i; ++i) {
    if (T == 1) {
      for (int j = 0; j < K; ++j) {
        const int64_t src = x + j - P;
        if (src >= 0 && src < width)
          acc[0] = _mm512_fmadd_ps(load<Full>(mask, taps + (i * K + j) * channels + c0),
                                   load<Full>(mask, rows[i] + src * pos + c0), acc[0]);
      }
    } else {
      // The T + K - 1 input positions of this row serve all T * K products.
      const float* src = rows[i] + (x - P) * pos + c0;
      __m512 in[T + K - 1];
#pragma GCC unroll 16
      for (int u = 0; u < T + K - 1; ++u) in[u] = load<Full>(mask, src + u * pos);
#pragma GCC unroll 8
      for (int j = 0; j < K; ++j) {
        const __m512 w = load<Full>(mask, taps + (i * K + j) * channels + c0);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(w, in[t + j], acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(out_row + (x + t) * channels + c0, mask, acc[t]);
}

// Positions x .. x + T - 1 of one output row, every channel.
template <int K, int T>
inline void positions(const float* const* rows, int first_i, int last_i, int64_t pos, const float* taps,
                      const float* bias, int64_t width, int64_t channels, int64_t x, float* out_row) {
  int64_t c0 = 0;
  for (; c0 + 16 <= channels; c0 += 16)
    tile<K, T, true>(rows, first_i, last_i, pos, taps, bias, width, channels, x, c0, 0xFFFF, out_row);
  if (c0 < channels) {
    const auto mask = static_cast<__mmask16>((1u << (channels - c0)) - 1);
    tile<K, T, false>(rows, first_i, last_i, pos, taps, bias, width, channels, x, c0, mask, out_row);
  }
}

// Output row y (all W positions and C channels): tiles of 8, then 4, positions between the borders, where
// every tap is inside the image, and single positions elsewhere.
template <int K>
void output_row(const float* image, const Strides& in, const float* taps, const float* bias, int64_t y,
                int64_t height, int64_t width, int64_t channels, float* out_row) {
  constexpr int P = K / 2;
  const int first_i = static_cast<int>(std::max<int64_t>(0, P - y));
  const int last_i = static_cast<int>(std::min<int64_t>(K, height + P - y));  // exclusive
  const float* rows[K];
  for (int i = first_i; i < last_i; ++i) rows[i] = image + (y + i - P) * in.row;
  const int64_t inner_end = std::max<int64_t>(P, width - P);
  int64_t x = 0;
  for (; x < std::min<int64_t>(P, width); ++x)
    positions<K, 1>(rows, first_i, last_i, in.position, taps, bias, width, channels, x, out_row);
  for (; x + 8 <= inner_end; x += 8)
    positions<K, 8>(rows, first_i, last_i, in.position, taps, bias, width, channels, x, out_row);
  for (; x + 4 <= inner_end; x += 4)
    positions<K, 4>(rows, first_i, last_i, in.position, taps, bias, width, channels, x, out_row);
  for (; x < width; ++x)
    positions<K, 1>(rows, first_i, last_i, in.position, taps, bias, width, channels, x, out_row);
}

#pragma GCC pop_options
#endif  // MMSECVIT_AVX512

}  // namespace

at::Tensor depthwise_conv(const at::Tensor& input, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(cpu_supported(), "mmsecvit depthwise kernel: this CPU lacks AVX-512 (avx512f, avx512dq)");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4 &&
                  input.stride(3) == 1,
              "input must be a (B, H, W, C) float32 CPU tensor with contiguous channels");
  const int64_t batch = input.size(0), height = input.size(1), width = input.size(2), channels = input.size(3);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 4 && weight.size(0) == channels &&
                  weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "weight must be a float32 (C, 1, k, k) tensor with C = ", channels, ", got ", weight.sizes());
  const int64_t kernel_size = weight.size(2);
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5, "kernel_size must be 3 or 5, got ", kernel_size);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == channels),
              "bias must be a float32 tensor of ", channels, " values");
  auto output = at::empty({batch, height, width, channels}, input.options());
#ifdef MMSECVIT_AVX512
  const at::Tensor taps = weight.reshape({channels, kernel_size * kernel_size}).t().contiguous();
  const at::Tensor bias_values = bias ? bias->contiguous() : at::Tensor();
  const float* in = input.data_ptr<float>();
  const float* tap_values = taps.data_ptr<float>();
  const float* bias_ptr = bias ? bias_values.data_ptr<float>() : nullptr;
  float* out = output.data_ptr<float>();
  const Strides strides{input.stride(0), input.stride(1), input.stride(2)};
  // Rows of at least ~32K outputs per task, so small maps do not pay for threads they cannot use.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, width * channels));
  at::parallel_for(0, batch * height, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / height, y = row % height;
      const float* image = in + b * strides.image;
      float* out_row = out + row * width * channels;
      if (kernel_size == 3)
        output_row<3>(image, strides, tap_values, bias_ptr, y, height, width, channels, out_row);
      else
        output_row<5>(image, strides, tap_values, bias_ptr, y, height, width, channels, out_row);
    }
  });
#endif
  return output;
}

}  // namespace mmsecvit
