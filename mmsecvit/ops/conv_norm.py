"""Convolution + norm (+ GELU) layers whose eval-mode batch norm is folded into the convolution at inference."""
from collections import OrderedDict
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from torch import Tensor

from . import dispatch


def fold_batch_norm(conv_weight: Tensor, conv_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor,
                    running_mean: Tensor, running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Weight and bias of one convolution equal to ``conv`` followed by an eval-mode batch norm."""
    scale = norm_weight * (running_var + eps).rsqrt()
    return conv_weight * scale[:, None, None, None], (conv_bias - running_mean) * scale + norm_bias


class ConvNormAct(nn.Sequential):
    """Conv (with bias), norm and optional GELU; state-dict keys ``conv.*``, e.g. ``bn.*``.

    Without autograd, an eval-mode affine batch norm is folded into the convolution and GELU works in place:
    one pass over the output instead of three.

    Args:
        in_dims, out_dims (int): Channels.
        kernel_size, stride (int): Of the convolution (padding ``kernel_size // 2``).
        norm_cfg (dict): mmcv norm config.
        gelu (bool): GELU after the norm.
    """

    def __init__(self, in_dims: int, out_dims: int, kernel_size: int, stride: int, norm_cfg: dict,
                 gelu: bool = False):
        norm_name, norm = build_norm_layer(norm_cfg, out_dims)
        layers = [('conv', nn.Conv2d(in_dims, out_dims, kernel_size, stride, kernel_size // 2)), (norm_name, norm)]
        if gelu:
            layers.append(('act', nn.GELU()))
        super().__init__(OrderedDict(layers))

    def forward(self, x: Tensor) -> Tensor:
        conv, norm = self[0], self[1]
        if dispatch.choose_backend('conv_norm', norm) == 'plain':
            return super().forward(x)
        weight, bias = fold_batch_norm(conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean,
                                       norm.running_var, norm.eps)
        x = F.conv2d(x, weight, bias, conv.stride, conv.padding)
        return torch.ops.aten.gelu_(x) if len(self) > 2 else x
