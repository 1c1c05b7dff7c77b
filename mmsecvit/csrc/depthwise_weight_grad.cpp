// Weight gradient of a stride-1, zero-padded ("same") depthwise convolution, for (B, H, W, C) tensors.
//
// dW[c, i, j] = sum over (b, y, x) of grad[b, y, x, c] * input[b, y + i - p, x + j - p, c], p = k // 2.
// PyTorch's CPU path (oneDNN) is slow for this, above all for k = 5. Here every thread takes a few blocks of
// 16 channels; for each output row it keeps the k input rows it needs, zero padded, in a ring of small
// buffers, and accumulates all k * k taps of its channels in registers, reading each gradient value once.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace mmsecvit {
namespace {

#ifdef MMSECVIT_AVX512
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")

// Taps of the NB * 16 channels from c0 (the last block masked to `mask`) summed over every (b, y, x);
// writes the k * k sums of each channel to weight_grad[channel * k * k + tap].
template <int K, int NB>
void channel_blocks(const float* input, const float* grad, int64_t batch, int64_t height, int64_t width,
                    int64_t channels, int64_t c0, __mmask16 mask, float* weight_grad) {
  constexpr int P = K / 2;
  constexpr int64_t kNone = std::numeric_limits<int64_t>::min();
  const int64_t padded_width = width + 2 * P;
  const int64_t position = NB * 16;  // floats per position in the ring
  // Ring of K zero-padded input rows of these channels.
  std::vector<float> ring(K * padded_width * position, 0.0f);
  int64_t ring_row[K];  // which input row each slot holds
  // Per-row sums in registers, added to float totals after every row (keeps the rounding error of long
  // sums small).
  __m512 acc[NB][K * K];
  std::vector<float> total(NB * K * K * 16, 0.0f);
  for (int64_t b = 0; b < batch; ++b) {
    const float* image = input + b * height * width * channels;
    const float* image_grad = grad + b * height * width * channels;
    for (int t = 0; t < K; ++t) ring_row[t] = kNone;
    for (int64_t y = 0; y < height; ++y) {
      // Input rows y - P .. y + P; rows outside the image are zeros.
      const float* rows[K];
      for (int i = 0; i < K; ++i) {
        const int64_t src = y + i - P;
        const int slot = static_cast<int>(((src % K) + K) % K);
        float* buffer = ring.data() + slot * padded_width * position;
        if (ring_row[slot] != src) {
          ring_row[slot] = src;
          if (src < 0 || src >= height) {
            std::memset(buffer, 0, padded_width * position * sizeof(float));
          } else {
            const float* in_row = image + src * width * channels + c0;
            for (int64_t x = 0; x < width; ++x)
              for (int n = 0; n < NB; ++n)
                _mm512_storeu_ps(buffer + (x + P) * position + n * 16,
                                 _mm512_maskz_loadu_ps(n == NB - 1 ? mask : 0xFFFF, in_row + x * channels + n * 16));
          }
        }
        rows[i] = buffer;
      }
      const float* grad_row = image_grad + y * width * channels + c0;
      for (int n = 0; n < NB; ++n)
        for (int t = 0; t < K * K; ++t) acc[n][t] = _mm512_setzero_ps();
      for (int64_t x = 0; x < width; ++x) {
        for (int n = 0; n < NB; ++n) {
          const __m512 g = _mm512_maskz_loadu_ps(n == NB - 1 ? mask : 0xFFFF, grad_row + x * channels + n * 16);
          for (int i = 0; i < K; ++i)
            for (int j = 0; j < K; ++j)
              acc[n][i * K + j] = _mm512_fmadd_ps(
                  g, _mm512_loadu_ps(rows[i] + (x + j) * position + n * 16), acc[n][i * K + j]);
        }
      }
      for (int n = 0; n < NB; ++n)
        for (int t = 0; t < K * K; ++t) {
          float* sum = total.data() + (n * K * K + t) * 16;
          _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), acc[n][t]));
        }
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int t = 0; t < K * K; ++t)
      for (int lane = 0; lane < 16 && c0 + n * 16 + lane < channels; ++lane)
        weight_grad[(c0 + n * 16 + lane) * K * K + t] = total[(n * K * K + t) * 16 + lane];
}

#pragma GCC pop_options
#endif  // MMSECVIT_AVX512

}  // namespace

at::Tensor depthwise_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, int64_t kernel_size) {
  TORCH_CHECK(cpu_supported(), "mmsecvit depthwise kernel: this CPU lacks AVX-512 (avx512f, avx512dq)");
  // k * k accumulators live in the 32 vector registers: 3x3 and 5x5 kernels.
  TORCH_CHECK(kernel_size == 3 || kernel_size == 5, "kernel_size must be 3 or 5, got ", kernel_size);
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4 &&
                  input.is_contiguous(),
              "input must be a contiguous (B, H, W, C) float32 CPU tensor");
  TORCH_CHECK(grad_output.sizes() == input.sizes() && grad_output.scalar_type() == at::kFloat &&
                  grad_output.is_contiguous(),
              "grad_output must be a contiguous float32 tensor of the input's shape");
  const int64_t batch = input.size(0), height = input.size(1), width = input.size(2), channels = input.size(3);
  auto weight_grad = at::empty({channels, 1, kernel_size, kernel_size}, input.options());
#ifdef MMSECVIT_AVX512
  const float* in = input.data_ptr<float>();
  const float* grad = grad_output.data_ptr<float>();
  float* out = weight_grad.data_ptr<float>();
  // Work units of three 16-channel blocks for 3x3 kernels (27 accumulators), of one block for 5x5 (25);
  // the last block of the channels, masked, is a unit of its own.
  const int64_t blocks = (channels + 15) / 16;
  const int64_t per_unit = kernel_size == 3 ? 3 : 1;
  const int64_t full_units = (channels / 16) / per_unit;
  const int64_t units = full_units + (blocks - full_units * per_unit);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      if (unit < full_units) {
        const int64_t c0 = unit * per_unit * 16;
        if (kernel_size == 3) channel_blocks<3, 3>(in, grad, batch, height, width, channels, c0, 0xFFFF, out);
        else channel_blocks<5, 1>(in, grad, batch, height, width, channels, c0, 0xFFFF, out);
      } else {
        const int64_t c0 = (full_units * per_unit + unit - full_units) * 16;
        const int64_t lanes = std::min<int64_t>(16, channels - c0);
        const auto mask = static_cast<__mmask16>((1u << lanes) - 1);
        if (kernel_size == 3) channel_blocks<3, 1>(in, grad, batch, height, width, channels, c0, mask, out);
        else channel_blocks<5, 1>(in, grad, batch, height, width, channels, c0, mask, out);
      }
    }
  });
#endif
  return weight_grad;
}

}  // namespace mmsecvit
