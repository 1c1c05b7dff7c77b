"""Fast ops of SecViT: functional ops, their autograd functions, the bricks the model is built from, and the
compiled CPU kernels as torch custom ops. Every choice between implementations is made in
:mod:`mmsecvit.ops.dispatch`; :func:`use_kernels` switches the compiled kernels off or picks their build."""
from .attention import cluster_assignment, cluster_length, sec_attention, semantic_order, split_values
from .conv_norm import ConvNormAct
from .depthwise import DepthwiseConvNHWC, depthwise_nhwc, gelu_depthwise_nhwc
from .dispatch import available_isas, choose_backend, kernel_isa, set_kernels, use_kernels, why_not
from .ffn import ConvFFN
from .linear import LinearNHWC, PackedQKV, linear_nhwc, norm_linear_nhwc
from .residual import residual_add
from .rotary import RotaryTables, apply_rope, rope_angles, rope_tables

__all__ = [
    'sec_attention', 'semantic_order', 'cluster_assignment', 'cluster_length', 'split_values', 'rope_angles',
    'rope_tables', 'apply_rope', 'RotaryTables', 'depthwise_nhwc', 'gelu_depthwise_nhwc', 'linear_nhwc',
    'norm_linear_nhwc', 'residual_add', 'ConvFFN', 'ConvNormAct', 'DepthwiseConvNHWC', 'LinearNHWC', 'PackedQKV',
    'use_kernels', 'set_kernels', 'kernel_isa', 'available_isas', 'choose_backend', 'why_not',
]
