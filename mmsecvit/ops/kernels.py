"""The compiled CPU kernels as ``torch.library`` custom ops (``torch.ops.mmsecvit.*``).

Each op runs the kernel build chosen by :mod:`mmsecvit.ops.dispatch` and has a fake implementation, so that
``torch.compile`` and ``torch.export`` trace it as one op. The attention op also has its autograd formula;
the depthwise ops are differentiated by the autograd functions of :mod:`mmsecvit.ops.depthwise`.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .dispatch import kernels


@torch.library.custom_op('mmsecvit::cluster_attention', mutates_args=())
def cluster_attention(rows: Tensor, sources: Tensor, parts: List[int], rope_axes: Optional[Tensor], heads: int,
                      height: int, width: int, key_scale: float) -> Tensor:
    """Attention inside the clusters listed by ``sources``: packed (R, 3 * D) rows to (R, D) in row order.

    Args:
        rows (Tensor): One row of q, k and v per (image, token, head), float32.
        sources (Tensor): The rows of each cluster, one cluster after another (a permutation of the rows).
        parts (list[int]): (first slot, cluster count, cluster length) triples covering ``sources``.
        rope_axes (Tensor | None): Rotary tables (:attr:`RotaryTables.axes`) when q and k are not rotated and k
            not scaled yet; the kernel then does both.
        heads, height, width (int): Heads and map size, for the rotary tables.
        key_scale (float): Factor of k, with ``rope_axes``.
    """
    return kernels().cluster_attention_forward(rows, sources, parts, rope_axes, heads, height, width, key_scale)


@cluster_attention.register_fake
def _(rows, sources, parts, rope_axes, heads, height, width, key_scale):
    return rows.new_empty(rows.shape[0], rows.shape[1] // 3)


@torch.library.custom_op('mmsecvit::cluster_attention_backward', mutates_args=())
def cluster_attention_backward(rows: Tensor, sources: Tensor, parts: List[int], grad_out: Tensor,
                               rope_axes: Optional[Tensor], heads: int, height: int, width: int,
                               key_scale: float) -> Tensor:
    """Gradient of :func:`cluster_attention`'s ``rows`` from its output's (probabilities recomputed)."""
    return kernels().cluster_attention_backward(rows, sources, parts, grad_out.contiguous(), rope_axes, heads,
                                                height, width, key_scale)


@cluster_attention_backward.register_fake
def _(rows, sources, parts, grad_out, rope_axes, heads, height, width, key_scale):
    return torch.empty_like(rows)


def _attention_setup(ctx, inputs, output):
    rows, sources, parts, rope_axes, heads, height, width, key_scale = inputs
    ctx.save_for_backward(rows, sources, rope_axes)
    ctx.parts, ctx.heads, ctx.height, ctx.width, ctx.key_scale = parts, heads, height, width, key_scale


def _attention_backward(ctx, grad_out):
    rows, sources, rope_axes = ctx.saved_tensors
    grad = cluster_attention_backward(rows, sources, ctx.parts, grad_out, rope_axes, ctx.heads, ctx.height,
                                      ctx.width, ctx.key_scale)
    return grad, None, None, None, None, None, None, None


cluster_attention.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op('mmsecvit::semantic_order', mutates_args=())
def semantic_order(rows: Tensor, batch: int, tokens: int, heads: int, rope_axes: Optional[Tensor], height: int,
                   width: int) -> Tensor:
    """Ranked token indices (B, heads, N) of packed (B * N * heads, 3 * D) rows, keys rotated first when
    ``rope_axes`` is given (then ``height * width == tokens``)."""
    return kernels().semantic_order(rows, batch, tokens, heads, rope_axes, height, width)


@semantic_order.register_fake
def _(rows, batch, tokens, heads, rope_axes, height, width):
    return rows.new_empty((batch, heads, tokens), dtype=torch.long)


@torch.library.custom_op('mmsecvit::depthwise_forward', mutates_args=())
def depthwise_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], gelu_input: bool) -> Tensor:
    """Stride-1 'same' depthwise convolution of a (B, H, W, C) tensor with contiguous channels (of its GELU
    with ``gelu_input``) by a (C, 1, k, k) weight, k 3 or 5; returns a contiguous (B, H, W, C) tensor."""
    return kernels().depthwise_forward(x, weight, bias, gelu_input)


@depthwise_forward.register_fake
def _(x, weight, bias, gelu_input):
    return x.new_empty(x.shape)


@torch.library.custom_op('mmsecvit::depthwise_backward', mutates_args=())
def depthwise_backward(x: Tensor, grad_out: Tensor, weight: Tensor, gelu_input: bool, input_grad: bool,
                       bias: Optional[Tensor], with_output: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`depthwise_forward` in one pass: (input or empty without ``input_grad``, weight, bias,
    channel sums of the input gradient or empty, the forward's output or empty without ``with_output``)."""
    results = kernels().depthwise_backward(x, grad_out, weight, gelu_input, input_grad, bias, with_output)
    return tuple(x.new_empty(0) if t is None else t.contiguous() for t in results)


@depthwise_backward.register_fake
def _(x, grad_out, weight, gelu_input, input_grad, bias, with_output):
    empty = x.new_empty(0)
    return (x.new_empty(x.shape) if input_grad else empty, weight.new_empty(weight.shape),
            x.new_empty(x.shape[-1]), x.new_empty(x.shape[-1]) if gelu_input and input_grad else empty,
            x.new_empty(x.shape) if with_output else empty)
