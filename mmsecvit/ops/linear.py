"""Linear layers on (B, H, W, C) maps: 1x1 projections, alone or after a LayerNorm.

On large float32 CPU maps the projections run as oneDNN 1x1 convolutions of the channels-last NCHW view,
with their own backward; the pre-norm before a projection can be recomputed in backward instead of kept
(see docs/performance.md).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import dispatch


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` on a (B, H, W, C) tensor as oneDNN's 1x1 convolution of its channels-last NCHW view."""
    return F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias).permute(0, 2, 3, 1).contiguous()


def row_grad(grad: Tensor, inputs: Tensor, param: Tensor) -> Tensor:
    """Gradient of a linear layer's weight from (..., out) gradients and (..., in) inputs.

    On the maps that :func:`linear_nhwc` runs as 1x1 convolutions, layers that narrow or keep the width
    (proj, fc2) take oneDNN's 1x1-convolution weight gradient; elsewhere it is one matmul.
    """
    if (grad.dim() == 4 and grad.shape[-1] <= inputs.shape[-1] and grad.dtype == inputs.dtype == param.dtype
            and dispatch.choose_backend('linear', grad) == 'conv1x1'):
        return torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), inputs.permute(0, 3, 1, 2), param.detach()[:, :, None, None], None, [1, 1],
            [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1].view(param.shape)
    rows = grad.reshape(-1, grad.shape[-1])
    return (rows.t() @ inputs.reshape(-1, inputs.shape[-1]).to(rows.dtype)).to(param.dtype)


def bias_grad(grad: Tensor, param: Tensor) -> Tensor:
    """Gradient of a linear layer's bias from (..., out) gradients."""
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(param.dtype)


class _PointwiseConv(torch.autograd.Function):
    """:func:`pointwise_conv` with a backward that takes the input gradient from a 1x1 convolution with the
    transposed weight and the weight gradient from :func:`row_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return pointwise_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = pointwise_conv(grad, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = row_grad(grad, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = bias_grad(grad, weight)
        return grad_x, grad_weight, grad_bias


def linear_nhwc(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` on a (B, H, W, C) tensor; a 1x1 convolution where :mod:`dispatch` chooses ``'conv1x1'``."""
    if dispatch.choose_backend('linear', x) == 'linear':
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _PointwiseConv.apply(x, weight, bias)
    return pointwise_conv(x, weight, bias)


def _project(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """:func:`linear_nhwc` without its autograd function (inside another one)."""
    return pointwise_conv(x, weight, bias) if dispatch.choose_backend('linear', x) == 'conv1x1' else F.linear(
        x, weight, bias)


class _NormLinear(torch.autograd.Function):
    """``F.linear(layer_norm(x), weight, bias)`` on a (B, H, W, C) tensor that keeps ``x`` but not the
    normalised map for backward, which recomputes it (one pass over ``x``)."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return _project(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        normed, mean, rstd = torch.ops.aten.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)
        grad = grad.contiguous()
        grad_weight = row_grad(grad, normed, weight) if needs[4] else None
        grad_bias = bias_grad(grad, weight) if ctx.has_bias and needs[5] else None
        del normed
        grad_x = grad_norm_weight = grad_norm_bias = None
        if any(needs[:3]):
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                _project(grad, weight.t()), x, x.shape[-1:], mean, rstd, norm_weight, norm_bias,
                [needs[0], needs[1], needs[2]])
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


def norm_linear_nhwc(x: Tensor, norm: nn.LayerNorm, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``linear_nhwc(norm(x), weight, bias)``; in training, where :mod:`dispatch` chooses
    ``'recompute_norm'``, the normalised map is recomputed in backward instead of kept."""
    params = (x, norm.weight, norm.bias, weight, bias)
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
            and dispatch.choose_backend('norm_linear', x) == 'recompute_norm'):
        return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias)
    return linear_nhwc(norm(x), weight, bias)


class LinearNHWC(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) on (B, H, W, C) maps, through :func:`linear_nhwc`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_nhwc(x, self.weight, self.bias)


class PackedQKV(nn.Linear):
    """The qkv projection (``nn.Linear(C, 3C)``, rows in the official (q/k/v, head, channel) order) that writes
    q, k and v of every (token, head) pair as one packed row.

    Args:
        embed_dims (int): Channels C.
        num_heads (int): Heads.
    """

    def __init__(self, embed_dims: int, num_heads: int):
        super().__init__(embed_dims, 3 * embed_dims)
        self.num_heads = num_heads

    def per_head(self, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        """Weight and bias with rows ordered (head, q/k/v, channel)."""
        channels = weight.shape[1]
        weight = weight.view(3, self.num_heads, -1, channels).transpose(0, 1)
        bias = bias.view(3, self.num_heads, -1).transpose(0, 1)
        return weight.reshape(3 * channels, channels), bias.reshape(3 * channels)

    def forward(self, x: Tensor, norm: Optional[nn.LayerNorm] = None) -> Tensor:
        """x: (B, H, W, C), normalised first by ``norm`` if given. Returns (B, H * W, heads, 3, head_dim).

        The rows are regrouped in the weight or, on maps with fewer positions than channels, in the output
        (whichever is smaller to copy).
        """
        batch, height, width, channels = x.shape
        head_dim = channels // self.num_heads
        by_weight = dispatch.choose_backend('qkv_layout', x) == 'regroup_weight'
        weight, bias = self.per_head(self.weight, self.bias) if by_weight else (self.weight, self.bias)
        packed = linear_nhwc(x, weight, bias) if norm is None else norm_linear_nhwc(x, norm, weight, bias)
        if by_weight:
            return packed.view(batch, height * width, self.num_heads, 3, head_dim)
        packed = packed.view(batch, height * width, 3, self.num_heads, head_dim).transpose(2, 3)
        return packed.contiguous()
