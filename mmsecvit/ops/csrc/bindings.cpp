// Python bindings of mmsecvit's CPU kernels. setup.py builds this module twice from the same sources:
// mmsecvit.ops._kernels_avx512 and mmsecvit.ops._kernels_avx2 (simd.h).
#include <torch/extension.h>

#include "kernels.h"

namespace kernels = mmsecvit::MMSECVIT_ISA_NAMESPACE;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", [] { return std::string(kernels::simd::kIsa); }, "The instruction set of this build: avx512 or avx2");
  m.def("supported", &kernels::cpu_supported, "Whether this CPU can run this build's kernels");
  m.def("cluster_attention_forward", &kernels::cluster_attention_forward,
        "Cluster attention: rows (R, 3d), cluster order, parts -> (R, d) in row order; with rope_axes, q and k "
        "are rotated and k scaled first",
        py::arg("rows"), py::arg("sources"), py::arg("parts"), py::arg("rope_axes") = py::none(),
        py::arg("heads") = 1, py::arg("height") = 0, py::arg("width") = 0, py::arg("key_scale") = 1.0);
  m.def("cluster_attention_backward", &kernels::cluster_attention_backward,
        "Gradient of the rows from the gradient of cluster_attention_forward's output",
        py::arg("rows"), py::arg("sources"), py::arg("parts"), py::arg("grad_out"), py::arg("rope_axes") = py::none(),
        py::arg("heads") = 1, py::arg("height") = 0, py::arg("width") = 0, py::arg("key_scale") = 1.0);
  m.def("semantic_order", &kernels::semantic_order,
        "Tokens of every (image, head) ranked by the cosine similarity of their key (rotated first with "
        "rope_axes) to the keys' sum: (B, heads, N)",
        py::arg("rows"), py::arg("batch"), py::arg("tokens"), py::arg("heads"), py::arg("rope_axes") = py::none(),
        py::arg("height") = 0, py::arg("width") = 0);
  m.def("depthwise_forward", &kernels::depthwise_forward,
        "Stride-1 'same' depthwise convolution of a (B, H, W, C) tensor (of its GELU with gelu_input) with a "
        "(C, 1, k, k) weight and optional bias",
        py::arg("input"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("gelu_input") = false);
  m.def("depthwise_backward", &kernels::depthwise_backward,
        "Gradients of depthwise_forward from the output gradient: [input, weight, bias, input channel sums] and, "
        "with with_output, the forward's output",
        py::arg("input"), py::arg("grad_output"), py::arg("weight"), py::arg("gelu_input") = false,
        py::arg("input_grad") = true, py::arg("bias") = py::none(), py::arg("with_output") = false);
}
