// Python bindings of mmsecvit's CPU kernels: the module mmsecvit._kernels.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("supported", &mmsecvit::cpu_supported, "Whether this CPU can run the kernels (AVX-512)");
  m.def("forward", &mmsecvit::cluster_attention_forward,
        "Cluster attention: rows (R, 3d), cluster order, parts -> (R, d) in row order");
  m.def("backward", &mmsecvit::cluster_attention_backward,
        "Gradient of the rows from the gradient of forward's output");
  m.def("depthwise_weight_grad", &mmsecvit::depthwise_weight_grad,
        "Weight gradient (C, 1, k, k) of a stride-1 'same' depthwise convolution of (B, H, W, C) tensors");
}
