"""2-D rotary position embedding of q and k, as tables per map and their application to packed q/k/v."""
from typing import Optional, Union

import torch
from torch import Tensor


def rope_angles(head_dim: int, device: Optional[Union[torch.device, str]] = None) -> Tensor:
    """Rotation frequencies of the 2-D rotary embedding: ``head_dim // 4`` values, each used twice.

    Returns:
        Tensor: Shape (head_dim // 2,), values ``1 / 10000 ** linspace(0, 1, head_dim // 4)`` interleaved.
    """
    if head_dim % 4:
        raise ValueError(f'2-D rotary embedding needs head_dim divisible by 4, got {head_dim}')
    angle = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4, device=device)
    return angle.repeat_interleave(2)


class RotaryTables:
    """Rotations of q and k (2-D rotary embedding, keys also scaled) for every token of an ``height x width``
    map, built when first needed (:func:`rope_tables`), in float32 (float64 for a float64 ``angle``).

    The first half of the channel pairs rotate with the row index, the second half with the column index,
    so the sines and cosines are computed per row and per column. No complex numbers are used, so the tables
    survive half-precision models and export.

    Attributes:
        axes (Tensor): Per row index, then per column index, the cosine of each channel's pair and the signed
            sine (-sin, sin) of each pair, shape (height + width, 2, head_dim // 2), float32: the kernels' table.
        cos, sin (Tensor): Per token, the cosine and signed sine of every channel of q (index 0), k (index 1,
            times the key scale) and v (index 2: 1 and 0), shape (N, 1, 3, head_dim): they broadcast over
            packed (B, N, heads, 3, head_dim). The PyTorch paths' tables.
    """

    def __init__(self, height: int, width: int, angle: Tensor, key_scale: float = 1.0):
        self.height, self.width, self.key_scale = height, width, key_scale
        angle = angle if angle.dtype == torch.float64 else angle.float()
        half = angle[::2]  # one frequency per rotated pair

        def rotations(length: int) -> Tensor:  # (length, 2, head_dim // 2): cosines, signed sines, per channel
            theta = torch.arange(length, device=angle.device, dtype=angle.dtype)[:, None] * half
            # Not repeat_interleave: the TorchScript ONNX exporter then gets the ranks of later ops on theta wrong.
            cos, sin = theta.cos(), theta.sin()
            cos = torch.stack([cos, cos], dim=-1).flatten(-2)
            sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
            return torch.stack([cos, sin], dim=1)

        self._by_axis = torch.cat([rotations(height), rotations(width)]).contiguous()
        self._token_table = None  # the per-token tables, built when a PyTorch path first needs them

    @property
    def axes(self) -> Tensor:
        return self._by_axis.float()

    @property
    def _per_token(self) -> Tensor:
        if self._token_table is None:
            self._token_table = self._build_per_token()
        return self._token_table

    def _build_per_token(self) -> Tensor:
        height, width = self.height, self.width
        by_row, by_column = self._by_axis[:height], self._by_axis[height:]
        q = torch.cat([by_row[:, None].expand(-1, width, -1, -1), by_column[None].expand(height, -1, -1, -1)], -1)
        v = torch.stack([torch.ones_like(q[:, :, 0]), torch.zeros_like(q[:, :, 1])], dim=2)
        table = torch.stack([q, q * self.key_scale, v], dim=2)  # (height, width, 3, 2, head_dim)
        return table.view(height * width, 1, 3, 2, -1)

    @property
    def cos(self) -> Tensor:
        return self._per_token[:, :, :, 0]

    @property
    def sin(self) -> Tensor:
        return self._per_token[:, :, :, 1]

    def kernel_args(self, heads: int) -> tuple:
        """The attention kernel's rotary arguments for packed rows of ``heads`` heads."""
        return self.axes, heads, self.height, self.width, self.key_scale


def rope_tables(height: int, width: int, angle: Tensor, key_scale: float = 1.0) -> RotaryTables:
    """Rotations of q and k for every token of an ``height x width`` map (v is left unrotated).

    Args:
        height, width (int): Feature map size.
        angle (Tensor): Output of :func:`rope_angles`, shape (head_dim // 2,).
        key_scale (float): Factor folded into the key rotation (``head_dim ** -0.5``).
    """
    return RotaryTables(height, width, angle, key_scale)


def swap_pairs(x: Tensor) -> Tensor:
    """Adjacent channels swapped: (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def apply_rope(packed: Tensor, rope: RotaryTables) -> Tensor:
    """Rotate adjacent channel pairs ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`` of q and k and scale k;
    returns a new tensor (the input is not changed).

    Args:
        packed (Tensor): Shape (B, N, heads, 3, head_dim), q, k and v; adjacent channels form the pairs.
        rope (RotaryTables): Tables from :func:`rope_tables`.
    """
    cos, sin = rope.cos.to(packed.dtype), rope.sin.to(packed.dtype)
    return torch.addcmul(packed * cos, swap_pairs(packed), sin)
