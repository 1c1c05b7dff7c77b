"""Projections on (B, H, W, C) maps (1x1-convolution path and its backward, alone and after the pre-norm) and
residual branches with stochastic depth, against float64 or mmcv."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import drop_path as mmcv_drop_path

from mmsecvit.ops import PackedQKV, linear_nhwc, norm_linear_nhwc, residual_add


@pytest.mark.parametrize('with_gamma', [False, True])
def test_residual_add_equals_mmcv_drop_path(with_gamma):
    x, branch = torch.randn(64, 3, 4, 8, requires_grad=True), torch.randn(64, 3, 4, 8, requires_grad=True)
    gamma = torch.rand(8, requires_grad=True) if with_gamma else None
    scaled = (lambda b: b) if gamma is None else (lambda b: gamma * b)
    torch.manual_seed(3)
    out = residual_add(x, branch, gamma, 0.3, training=True)
    torch.manual_seed(3)
    expected = x + mmcv_drop_path(scaled(branch), 0.3, training=True)
    torch.testing.assert_close(out, expected)
    dropped = (out.detach() == x.detach()).flatten(1).all(1)
    assert 0 < dropped.sum() < len(dropped)  # some samples drop the branch, the others keep it
    leaves = [t for t in (x, branch, gamma) if t is not None]
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(residual_add(x, branch, gamma, 0.3, training=False), x + scaled(branch))


def test_linear_nhwc_inference_path_equals_linear():
    x = torch.randn(2, 40, 33, 48)  # 1320 positions: the 1x1-convolution path
    weight, bias = torch.randn(96, 48) * 0.1, torch.randn(96)
    with torch.no_grad():
        out = linear_nhwc(x, weight, bias)
    assert out.shape == (2, 40, 33, 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    small = torch.randn(1, 8, 8, 48)
    with torch.no_grad():
        torch.testing.assert_close(linear_nhwc(small, weight, bias), F.linear(small, weight, bias))


# A widening layer (weight gradient from a matmul) and a narrowing one (from oneDNN's 1x1 convolution).
@pytest.mark.parametrize('in_dims, out_dims', [(48, 96), (96, 48)])
def test_linear_nhwc_training_path_matches_float64_linear_with_gradients(in_dims, out_dims):
    x = torch.randn(2, 40, 33, in_dims, requires_grad=True)  # 1320 positions: the 1x1-convolution path
    weight = (torch.randn(out_dims, in_dims) * 0.1).requires_grad_()
    bias = torch.randn(out_dims, requires_grad=True)
    grad_out = torch.randn(2, 33, 40, out_dims).transpose(1, 2)  # a non-contiguous incoming gradient
    out = linear_nhwc(x, weight, bias)
    assert out.grad_fn is not None and 'PointwiseConv' in type(out.grad_fn).__name__
    grads = torch.autograd.grad(out, (x, weight, bias), grad_out)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = F.linear(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-4)
    frozen = linear_nhwc(x, weight.detach(), None)  # frozen layer without bias: only the input gradient
    (grad_x,) = torch.autograd.grad(frozen, x, grad_out)
    torch.testing.assert_close(grad_x.double(), grad_out.double() @ weight.detach().double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('height, width', [(40, 33), (7, 9)])  # the 1x1-convolution and the F.linear products
def test_norm_linear_nhwc_matches_float64_and_keeps_only_its_input(height, width):
    norm = nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = (torch.randn(2, height, width, 48) * 3 + 1).requires_grad_()
    weight = (torch.randn(96, 48) * 0.1).requires_grad_()
    bias = torch.randn(96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm_linear_nhwc(x, norm, weight, bias)
    # x and the four parameters, not the normalised (B, H, W, C) map.
    assert sum(t.numel() for t in saved) == x.numel() + 2 * 48 + weight.numel()
    grad_out = torch.randn_like(out)
    params = (x, norm.weight, norm.bias, weight, bias)
    grads = torch.autograd.grad(out, params, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in params]
    ref = F.linear(F.layer_norm(leaves[0], (48,), leaves[1], leaves[2], 1e-6), leaves[3], leaves[4])
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-4)
    # Frozen norm and projection: only the input gradient.
    norm.requires_grad_(False)
    (grad_x,) = torch.autograd.grad(norm_linear_nhwc(x, norm, weight.detach(), None), x, grad_out)
    torch.testing.assert_close(grad_x.double(), ref_grads[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('height, width', [(3, 5), (40, 33)])  # fewer positions than channels, and more
def test_packed_qkv_writes_per_head_rows_in_both_layouts(height, width):
    qkv = PackedQKV(64, 2)
    norm = nn.LayerNorm(64)
    x = torch.randn(2, height, width, 64, requires_grad=True)
    out = qkv(x, norm)
    expected = F.linear(norm(x), qkv.weight, qkv.bias).view(2, height * width, 3, 2, 32).transpose(2, 3)
    assert out.shape == (2, height * width, 2, 3, 32) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    params = [x, qkv.weight, qkv.bias]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
