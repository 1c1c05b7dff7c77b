"""The SecViT FFN brick (1x1, GELU, residual 3x3 depthwise, 1x1 on (B, H, W, C) maps) and the recomputation
that keeps its activations out of memory in training."""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from . import dispatch
from .depthwise import gelu_depthwise_grads, gelu_depthwise_nhwc
from .linear import bias_grad, linear_nhwc, row_grad

# What the FFN keeps for backward in training: 'none' keeps every activation (plain autograd);
# 'activation' keeps its input and fc1's output and recomputes the norm, GELU and depthwise conv;
# 'all' keeps only its input and recomputes fc1 as well.
RECOMPUTE_MODES = ('none', 'activation', 'all')


def autocast_state(device_type: str) -> dict:
    """Keyword arguments of ``torch.autocast`` that re-enter the current autocast state of ``device_type``."""
    if not torch.amp.is_autocast_available(device_type):  # the meta device: no autocast state to re-enter
        return dict(device_type='cpu', enabled=False)
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


class _RecomputedNormFFN(torch.autograd.Function):
    """``ffn(norm(x))`` that keeps for backward only ``x`` and, with ``keep_pre_act``, fc1's output.

    The backward recomputes the norm, GELU and depthwise conv (and fc1's output when it was not kept) and
    differentiates fc1 and fc2 by hand, so fc2's matmul, and with ``keep_pre_act`` fc1's, is never rerun.
    GELU and the depthwise conv are differentiated together (:func:`gelu_depthwise_grads`), which also gives
    fc1's bias gradient and fc2's input. Inputs after ``keep_pre_act`` are the parameters, in :meth:`params`
    order, so that they receive gradients.
    """

    @staticmethod
    def params(norm: nn.LayerNorm, ffn: 'ConvFFN') -> Tuple[Tensor, ...]:
        return (norm.weight, norm.bias, ffn.fc1.weight, ffn.fc1.bias, ffn.dwconv.weight, ffn.dwconv.bias,
                ffn.fc2.weight, ffn.fc2.bias)

    @staticmethod
    def forward(ctx, x, norm, ffn, keep_pre_act, *params):
        pre_act = linear_nhwc(norm(x), ffn.fc1.weight, ffn.fc1.bias)
        ctx.save_for_backward(x, pre_act if keep_pre_act else None)
        ctx.norm, ctx.ffn = norm, ffn
        ctx.autocast = autocast_state(x.device.type)
        return linear_nhwc(ffn.activate(pre_act, inplace=not keep_pre_act), ffn.fc2.weight, ffn.fc2.bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, pre_act = ctx.saved_tensors
        # needs_input_grad: x (0), norm weight/bias (4, 5), fc1 (6, 7), dwconv (8, 9), fc2 (10, 11).
        needs = ctx.needs_input_grad
        norm, ffn = ctx.norm, ctx.ffn
        grads = [None] * len(needs)
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            x = x.detach().requires_grad_(needs[0])
            normed = norm(x)
        below_fc2 = any(needs[:10])  # anything but fc2's parameters needs a gradient
        with torch.no_grad(), torch.autocast(**ctx.autocast):
            if pre_act is None:
                pre_act = linear_nhwc(normed, ffn.fc1.weight, ffn.fc1.bias)
            if not below_fc2:
                hidden = ffn.activate(pre_act)
        grad_out = grad_out.to(pre_act.dtype)
        if below_fc2:
            # fc2's input gradient does not need fc2's input, which the one-pass GELU + depthwise backward
            # recomputes along with its gradients.
            grad_hidden = linear_nhwc(grad_out, ffn.fc2.weight.t().to(grad_out.dtype), None)
            with torch.autocast(**ctx.autocast):
                grad_pre_act, grad_dw_weight, grad_dw_bias, grad_fc1_bias, hidden = gelu_depthwise_grads(
                    ffn.dwconv, pre_act, grad_hidden, residual=True)
            del grad_hidden
            grads[8] = grad_dw_weight if needs[8] else None
            grads[9] = grad_dw_bias if needs[9] else None
        if needs[10]:
            grads[10] = row_grad(grad_out, hidden, ffn.fc2.weight)
        if needs[11]:
            grads[11] = bias_grad(grad_out, ffn.fc2.bias)
        if not below_fc2:
            return tuple(grads)
        del hidden
        if needs[6]:
            grads[6] = row_grad(grad_pre_act, normed, ffn.fc1.weight)
        if needs[7]:
            grads[7] = grad_fc1_bias.to(ffn.fc1.bias.dtype)
        norm_inputs = [(i, t) for i, t in ((0, x), (4, norm.weight), (5, norm.bias)) if needs[i]]
        if norm_inputs:
            grad_normed = linear_nhwc(grad_pre_act, ffn.fc1.weight.t().to(grad_pre_act.dtype), None)
            for (i, _), grad in zip(norm_inputs, torch.autograd.grad(
                    normed, [t for _, t in norm_inputs], grad_normed.to(normed.dtype))):
                grads[i] = grad
        return tuple(grads)


class ConvFFN(nn.Module):
    """FFN: 1x1 (C -> hidden), GELU, residual 3x3 depthwise conv, 1x1 (hidden -> C), on (B, H, W, C) maps.

    Args:
        embed_dims (int): Channels C.
        hidden_dims (int): Hidden channels.
        recompute (str): What is kept for backward in training (:data:`RECOMPUTE_MODES`); results are the
            same in every mode.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, recompute: str = 'none'):
        super().__init__()
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f'recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}')
        self.recompute = recompute
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.dwconv = nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def activate(self, pre_act: Tensor, inplace: bool = False) -> Tensor:
        """GELU and the residual depthwise conv: fc1's output to fc2's input (see :func:`gelu_depthwise_nhwc`;
        ``inplace`` may overwrite ``pre_act``)."""
        return gelu_depthwise_nhwc(self.dwconv, pre_act, residual=True, inplace=inplace)

    def forward(self, x: Tensor, norm: Optional[nn.Module] = None) -> Tensor:
        """x: (B, H, W, C), normalised first by ``norm`` (the block's pre-norm) if given."""
        params = _RecomputedNormFFN.params(norm, self) if isinstance(norm, nn.LayerNorm) else ()
        if (self.recompute != 'none' and params and torch.is_grad_enabled()
                and any(t.requires_grad for t in (x, *params)) and dispatch.choose_backend('ffn') == 'recompute'):
            return _RecomputedNormFFN.apply(x, norm, self, self.recompute == 'activation', *params)
        pre_act = linear_nhwc(x if norm is None else norm(x), self.fc1.weight, self.fc1.bias)
        hidden = self.activate(pre_act, inplace=not torch.is_grad_enabled())
        return linear_nhwc(hidden, self.fc2.weight, self.fc2.bias)
