// mmsecvit's CPU kernels (float32), compiled once per ISA (simd.h) and bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "simd.h"

namespace mmsecvit {
namespace MMSECVIT_ISA_NAMESPACE {

// The CPU features this build needs that this CPU lacks, space separated; empty where it runs the kernels.
inline const std::string& missing_cpu_features() {
  static const std::string missing = [] {
    __builtin_cpu_init();
    std::string names;
    const auto need = [&](bool present, const char* name) {
      if (!present) names += names.empty() ? name : std::string(" ") + name;
    };
#if defined(__AVX512F__)
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512dq"), "avx512dq");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
#endif
    need(__builtin_cpu_supports("avx2"), "avx2");
    need(__builtin_cpu_supports("fma"), "fma");
    return names;
  }();
  return missing;
}

// Whether this CPU runs this build's kernels; the module loads on any x86-64 CPU.
inline bool cpu_supported() { return missing_cpu_features().empty(); }

// Fails, naming the kernel and the CPU features it lacks, unless this CPU runs this build.
inline void check_cpu_supported(const char* kernel) {
  TORCH_CHECK(cpu_supported(), "mmsecvit ", kernel, " kernel (", simd::kIsa, " build): this CPU lacks ",
              missing_cpu_features());
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

}  // namespace MMSECVIT_ISA_NAMESPACE
}  // namespace mmsecvit
