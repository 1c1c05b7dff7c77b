// mmsecvit's CPU kernels (float32, AVX-512), bound to Python as mmsecvit._kernels in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMSECVIT_AVX512 1
#include <immintrin.h>
#endif

namespace mmsecvit {

// Whether this CPU runs the kernels (avx512f and avx512dq); the module loads on any x86-64 CPU.
inline bool cpu_supported() {
#ifdef MMSECVIT_AVX512
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// Attention inside clusters of packed q/k/v rows (cluster_attention.cpp). With `rope_axes` (see rotary.h) the
// rows' q and k are not yet rotated or scaled; the kernels do both.
at::Tensor cluster_attention_forward(const at::Tensor& rows, const at::Tensor& sources,
                                     const std::vector<int64_t>& parts, const c10::optional<at::Tensor>& rope_axes,
                                     int64_t heads, int64_t height, int64_t width, double key_scale);
at::Tensor cluster_attention_backward(const at::Tensor& rows, const at::Tensor& sources,
                                      const std::vector<int64_t>& parts, const at::Tensor& grad_out,
                                      const c10::optional<at::Tensor>& rope_axes, int64_t heads, int64_t height,
                                      int64_t width, double key_scale);

// Ranked token indices (B, heads, N) of SEC attention from packed q/k/v rows (semantic_order.cpp), whose keys
// are rotated first when `rope_axes` is given (N = height * width then).
at::Tensor semantic_order(const at::Tensor& rows, int64_t batch, int64_t tokens, int64_t heads,
                          const c10::optional<at::Tensor>& rope_axes, int64_t height, int64_t width);

// Stride-1 "same" depthwise convolution of a (B, H, W, C) tensor with contiguous channels, optionally of the
// exact GELU of the input; returns a contiguous (B, H, W, C) tensor (depthwise.cpp).
at::Tensor depthwise_forward(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             bool gelu_input);

// Its backward in one pass: [input gradient (undefined unless input_grad), weight gradient (C, 1, k, k), bias
// gradient (C), channel sums of the input gradient (with gelu_input and input_grad, else undefined), the
// forward's output with `bias` (with with_output, else undefined)].
std::vector<at::Tensor> depthwise_backward(const at::Tensor& input, const at::Tensor& grad_output,
                                           const at::Tensor& weight, bool gelu_input, bool input_grad,
                                           const c10::optional<at::Tensor>& bias, bool with_output);

}  // namespace mmsecvit
