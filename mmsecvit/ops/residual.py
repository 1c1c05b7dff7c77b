"""Residual branches with layer scale and stochastic depth in one operation."""
from typing import Optional

import torch
from torch import Tensor


def residual_add(x: Tensor, branch: Tensor, gamma: Optional[Tensor] = None, drop_prob: float = 0.0,
                 training: bool = False) -> Tensor:
    """``x + drop_path(gamma * branch)``.

    The per-sample keep mask (drawn as mmcv's ``DropPath`` draws it, divided by the keep probability) and
    the layer scale form one broadcast factor, so the branch costs one ``addcmul``.

    Args:
        x (Tensor): Residual input.
        branch (Tensor): Branch output, the shape of ``x``.
        gamma (Tensor | None): Layer scale per channel (last dim), or None.
        drop_prob (float): Probability of dropping the branch for each sample, in training only.
        training (bool): Whether stochastic depth is active.
    """
    scale = gamma
    if training and drop_prob > 0:
        keep_prob = 1 - drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        keep = (keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_() / keep_prob
        scale = keep if scale is None else keep * scale
    return x + branch if scale is None else torch.addcmul(x, branch, scale)
