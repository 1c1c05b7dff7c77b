"""The 2-D rotary embedding: its tables against complex rotations, and its application."""
import pytest
import torch

from mmsecvit.ops import (
    apply_rope,
    rope_angles,
    rope_tables,
)


def complex_rotations(height, width, head_dim, key_scale):
    """Reference: cos + i sin of q's and k's channel pairs per token, (N, 2, head_dim // 2), from the angles."""
    half = rope_angles(head_dim).double()[::2]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
    theta = torch.cat([ys.reshape(-1, 1) * half[None], xs.reshape(-1, 1) * half[None]], -1)
    rotation = torch.polar(torch.ones_like(theta), theta)
    return torch.stack([rotation, rotation * key_scale], dim=1)


def test_rope_tables_hold_the_complex_rotations():
    rope = rope_tables(3, 5, rope_angles(16), key_scale=0.25)
    axes = rope.axes  # (height + width, 2, 8): per row, then per column, the cosines of 8 channels, then sines
    assert axes.shape == (8, 2, 8) and axes.dtype == torch.float32
    rotation = complex_rotations(3, 5, 16, 0.25)[:, 0].view(3, 5, 8)  # q's: 4 pairs by row, 4 by column
    for y in range(3):
        for x in range(5):
            table = torch.cat([axes[y], axes[3 + x]], dim=-1).double()  # (cos, signed sin) of the 16 channels
            torch.testing.assert_close(table[0, 0::2], rotation[y, x].real, rtol=0, atol=1e-7)
            torch.testing.assert_close(table[0, 1::2], table[0, 0::2])
            torch.testing.assert_close(table[1, 1::2], rotation[y, x].imag, rtol=0, atol=1e-7)
            torch.testing.assert_close(table[1, 0::2], -rotation[y, x].imag, rtol=0, atol=1e-7)
    assert rope.cos.shape == rope.sin.shape == (15, 1, 3, 16)
    torch.testing.assert_close(rope.cos[:, 0, 0], torch.cat([axes[:3, 0, None].expand(3, 5, 8),
                                                             axes[None, 3:, 0].expand(3, 5, 8)], -1).view(15, 16))
    torch.testing.assert_close(rope.cos[:, 0, 1], rope.cos[:, 0, 0] * 0.25)
    torch.testing.assert_close(rope.sin[:, 0, 1], rope.sin[:, 0, 0] * 0.25)
    assert (rope.cos[:, 0, 2] == 1).all() and (rope.sin[:, 0, 2] == 0).all()


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
def test_apply_rope_equals_complex_multiplication_and_leaves_its_input(dtype):
    rope = rope_tables(4, 6, rope_angles(16).to(torch.float64 if dtype == torch.float64 else torch.float32), 0.25)
    packed = torch.randn(2, 24, 3, 3, 16).to(dtype)
    before = packed.clone()
    with torch.no_grad():
        rotated = apply_rope(packed, rope)
    assert torch.equal(packed, before) and rotated.dtype == dtype
    pairs = torch.view_as_complex(packed.double().unflatten(-1, (-1, 2)).contiguous())
    rotation = complex_rotations(4, 6, 16, 0.25)[:, None]  # (N, 1, 2, pairs)
    expected = torch.view_as_real(torch.cat([pairs[:, :, :, :2] * rotation, pairs[:, :, :, 2:]], dim=3)).flatten(-2)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(rotated.double(), expected, rtol=tolerance, atol=tolerance * 4)
