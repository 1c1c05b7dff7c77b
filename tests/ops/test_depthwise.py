"""Depthwise convolution on (B, H, W, C) maps, alone and of GELU's output: the kernels' forward and one-pass
backward, the PyTorch paths' backward, and the dispatch between them (also in half precision, upcast to float32
where that is faster), against float64 references."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmsecvit.ops import (
    depthwise_nhwc,
    dispatch,
    gelu_depthwise_nhwc,
)
from mmsecvit.ops.depthwise import depthwise_weight_grad, gelu_depthwise_grads

from helpers import assert_float32_close


def reference_depthwise(conv, x, residual):
    weight = conv.weight
    if residual:
        centre = conv.kernel_size[0] // 2
        weight = weight + F.pad(torch.ones_like(weight[:, :, :1, :1]), (centre, centre, centre, centre))
    return F.conv2d(x.permute(0, 3, 1, 2), weight, conv.bias, 1, conv.padding, 1, conv.groups).permute(0, 2, 3, 1)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])  # float32 3x3/5x5: the compiled weight grad
@pytest.mark.parametrize('kernel_size', [3, 5, 7])
@pytest.mark.parametrize('residual', [False, True])
def test_depthwise_gradients_match_pytorch(kernel_size, residual, dtype):
    conv = nn.Conv2d(6, 6, kernel_size, padding=kernel_size // 2, groups=6).to(dtype)
    x = torch.randn(2, 9, 11, 6, dtype=dtype, requires_grad=True)
    out = depthwise_nhwc(conv, x, residual)
    assert 'DepthwiseConv' in type(out.grad_fn.next_functions[0][0]).__name__  # the custom backward ran
    expected = reference_depthwise(conv, x, residual)
    torch.testing.assert_close(out, expected)
    # A gradient in another memory layout than the output's.
    grad = torch.randn(2, 11, 9, 6, dtype=dtype).transpose(1, 2)
    params = [x, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('batch, channels, height, width, kernel_size',
                         [(1, 64, 37, 53, 5), (2, 70, 9, 11, 3), (2, 20, 7, 5, 5), (1, 17, 3, 2, 5), (1, 6, 4, 4, 3)])
def test_depthwise_weight_grad_float32_tolerance(backend, batch, channels, height, width, kernel_size):
    # Channel counts that are not multiples of 16 and maps smaller than the kernel included.
    shape = (batch, channels, height, width)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_weight(x.double(), (channels, 1, kernel_size, kernel_size), grad.double(),
                                           padding=kernel_size // 2, groups=channels)
    if backend != 'pytorch':
        weight = torch.randn(channels, 1, kernel_size, kernel_size)
        result = dispatch.kernels().depthwise_backward(x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1), weight,
                                             input_grad=False)[1]
    else:
        result = depthwise_weight_grad(x, grad, kernel_size)
    assert_float32_close(result, expected, terms=batch * height * width)


def float64_depthwise(x, weight, bias, gelu):
    """Reference: (B, H, W, C) float64 depthwise convolution of x or of gelu(x), with gradients."""
    x, weight = x.double(), weight.double()
    bias = None if bias is None else bias.double()
    return F.conv2d((F.gelu(x) if gelu else x).permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2,
                    groups=weight.shape[0]).permute(0, 2, 3, 1)


KERNEL_CASES = [(2, 7, 9, 20, 3), (1, 1, 1, 16, 5), (1, 3, 2, 33, 5), (2, 13, 17, 64, 5), (1, 6, 11, 48, 3),
                (3, 10, 12, 40, 3)]


@pytest.mark.parametrize('gelu', [False, True])
@pytest.mark.parametrize('batch, height, width, channels, kernel_size', KERNEL_CASES)
def test_depthwise_kernels_equal_float64(kernel, batch, height, width, channels, kernel_size, gelu):
    # Channel counts that are not multiples of 16, maps smaller than the kernel, batches, with and without
    # GELU on the input: the forward, and every gradient of the one-pass backward.
    x = 2 * torch.randn(batch, height, width, channels)
    weight = torch.randn(channels, 1, kernel_size, kernel_size)
    bias = torch.randn(channels)
    grad = torch.randn(batch, height, width, channels)
    reference = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected = float64_depthwise(*reference, gelu)
    expected_grads = torch.autograd.grad(expected, reference, grad.double())
    result = kernel.depthwise_forward(x, weight, bias, gelu)
    assert result.is_contiguous() and result.shape == x.shape
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(kernel.depthwise_forward(x, weight, None, gelu).double(), expected - bias.double(),
                               rtol=0, atol=1e-5)
    grad_x, grad_weight, grad_bias, grad_sum, output = kernel.depthwise_backward(x, grad, weight, gelu)
    for got, want in zip((grad_x, grad_weight, grad_bias), expected_grads):
        assert_float32_close(got, want)
    if gelu:  # the input gradient's channel sums
        assert_float32_close(grad_sum, expected_grads[0].sum((0, 1, 2)))
    else:
        assert grad_sum is None
    assert output is None
    # On request, the forward's output too (the same rows, from the backward's pass).
    again = kernel.depthwise_backward(x, grad, weight, gelu, bias=bias, with_output=True)
    torch.testing.assert_close(again[4], result, rtol=0, atol=0)
    torch.testing.assert_close(again[1], grad_weight, rtol=0, atol=0)


@pytest.mark.parametrize('gelu', [False, True])
def test_depthwise_kernels_read_strided_positions(kernel, gelu):
    # A channel slice of a wider tensor (e.g. v of packed q/k/v): positions are 3 * C apart.
    wide, wide_grad = torch.randn(2, 9, 10, 3 * 48), torch.randn(2, 9, 10, 3 * 48)
    x, grad = wide[..., 96:], wide_grad[..., :48]
    weight = torch.randn(48, 1, 5, 5)
    reference = [x.double().requires_grad_(), weight.double().requires_grad_()]
    expected = float64_depthwise(*reference, None, gelu)
    torch.testing.assert_close(kernel.depthwise_forward(x, weight, None, gelu).double(), expected, rtol=0, atol=1e-5)
    result = kernel.depthwise_backward(x, grad, weight, gelu)
    for got, want in zip(result, torch.autograd.grad(expected, reference, grad.double())):
        assert_float32_close(got, want)


def test_depthwise_kernels_check_their_inputs(kernel):
    x = torch.randn(1, 8, 8, 16)
    weight = torch.randn(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match='kernel_size must be 3 or 5'):
        kernel.depthwise_forward(x, torch.randn(16, 1, 7, 7))
    with pytest.raises(RuntimeError, match='kernel_size must be 3 or 5'):
        kernel.depthwise_backward(x, x, torch.randn(16, 1, 7, 7))
    with pytest.raises(RuntimeError, match='contiguous channels'):
        kernel.depthwise_forward(x.transpose(2, 3), torch.randn(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='C = 16'):
        kernel.depthwise_forward(x, torch.randn(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='bias must be'):
        kernel.depthwise_forward(x, weight, torch.randn(8))
    with pytest.raises(RuntimeError, match="input's shape"):
        kernel.depthwise_backward(x, x[:, :4], weight)
    with pytest.raises(RuntimeError, match='contiguous channels'):
        kernel.depthwise_backward(x, x.transpose(2, 3), weight)


@pytest.mark.parametrize('kernel_size', [3, 5])
def test_inference_depthwise_conv_takes_the_kernel_where_dispatch_says(backend, kernel_size):
    # 3x3 kernels on every map, 5x5 up to KERNEL_MAX_VALUES_5X5 values; either way the result is PyTorch's
    # convolution, with the residual folded in.
    conv = nn.Conv2d(32, 32, kernel_size, padding=kernel_size // 2, groups=32)
    small, large = torch.randn(1, 14, 14, 32), torch.randn(1, 130, 130, 32)
    assert large.numel() > dispatch.KERNEL_MAX_VALUES_5X5
    with torch.no_grad():
        for x in (small, large):
            for residual in (False, True):
                torch.testing.assert_close(depthwise_nhwc(conv, x, residual), reference_depthwise(conv, x, residual))
            chosen = dispatch.choose_backend('depthwise', x.permute(0, 3, 1, 2), conv.weight)
            takes_kernel = backend != 'pytorch' and (kernel_size == 3 or x is small)
            assert chosen == ('kernel' if takes_kernel else 'torch'), dispatch.why_not(
                'depthwise', x.permute(0, 3, 1, 2), conv.weight)


@pytest.mark.parametrize('residual', [False, True])
def test_gelu_depthwise_equals_gelu_then_conv(backend, residual):
    # The FFN's GELU and depthwise conv, in inference, with autograd, and as gradients without autograd state
    # (what the FFN recomputation uses), against float64 GELU + conv; also with a frozen weight and no bias.
    compiled = backend != 'pytorch'
    conv = nn.Conv2d(40, 40, 3, padding=1, groups=40)
    x = 2 * torch.randn(2, 9, 13, 40)
    grad = torch.randn(2, 9, 13, 40)
    expected_conv = nn.Conv2d(40, 40, 3, padding=1, groups=40).double()
    expected_conv.load_state_dict(conv.state_dict())
    reference_x = x.double().requires_grad_()
    expected = reference_depthwise(expected_conv, F.gelu(reference_x), residual)
    params = [reference_x, expected_conv.weight, expected_conv.bias]
    expected_grads = torch.autograd.grad(expected, params, grad.double())
    with torch.no_grad():
        torch.testing.assert_close(gelu_depthwise_nhwc(conv, x, residual).double(), expected, rtol=0, atol=1e-5)
    x.requires_grad_()
    out = gelu_depthwise_nhwc(conv, x, residual)
    depthwise_node = out.grad_fn.next_functions[0][0]
    assert 'DepthwiseConv' in type(depthwise_node).__name__
    # The node behind the convolution's (permuted) input: GELU's own where it is a separate operation, x's
    # where the compiled kernel applies GELU inside the convolution.
    behind_input = depthwise_node.next_functions[0][0].next_functions[0][0]
    assert ('Gelu' in type(behind_input).__name__) != compiled
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    positions = 2 * 9 * 13
    for got, want in zip(torch.autograd.grad(out, [x, conv.weight, conv.bias], grad), expected_grads):
        assert_float32_close(got, want, terms=positions)
    results = gelu_depthwise_grads(conv, x.detach(), grad, residual)
    for got, want in zip(results, expected_grads + (expected_grads[0].sum((0, 1, 2)), expected.detach())):
        assert_float32_close(got, want, terms=positions)
    frozen = nn.Conv2d(40, 40, 3, padding=1, groups=40, bias=False).requires_grad_(False)
    grad_x, grad_weight, grad_bias, _, _ = gelu_depthwise_grads(frozen, x.detach(), grad, residual)
    assert grad_bias is None and (grad_weight is None) != compiled  # the compiled pass gives the weight's anyway
    with torch.enable_grad():
        reference = reference_depthwise(frozen.double(), F.gelu(reference_x), residual)
    assert_float32_close(grad_x, torch.autograd.grad(reference, reference_x, grad.double())[0], terms=9)


def test_depthwise_falls_back_outside_its_case():
    # Strided convolutions and inference use PyTorch's convolution unchanged.
    strided = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
    x = torch.randn(1, 8, 8, 4, requires_grad=True)
    out = depthwise_nhwc(strided, x)
    assert out.shape == (1, 4, 4, 4) and 'DepthwiseConv' not in type(out.grad_fn.next_functions[0][0]).__name__
    with torch.no_grad():
        torch.testing.assert_close(depthwise_nhwc(strided, x), strided(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


HALF_DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(params=[False, True], ids=['no-onednn-half', 'onednn-half'])
def onednn_half(request, monkeypatch):
    """Dispatch as on a CPU where oneDNN has no half-precision convolutions, then as on one where it has."""
    for dtype in HALF_DTYPES:
        monkeypatch.setitem(dispatch._ONEDNN_HALF, dtype, request.param)
    return request.param


def assert_rounded(got, want, dtype):
    """``got`` is in ``dtype`` and within its rounding of the float64 ``want``, up to float32 error."""
    assert got.dtype == dtype, (got.dtype, dtype)
    scale = max(want.abs().max().item(), 1e-3)
    torch.testing.assert_close(got.double(), want, rtol=torch.finfo(dtype).eps, atol=1e-5 * scale)


def float64_copy(conv):
    expected = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                         groups=conv.groups).double()
    expected.load_state_dict(conv.state_dict())
    return expected


def float64_reference(conv, x, grad, residual):
    """The convolution's output and (input, weight, bias) gradients in float64."""
    expected_conv = float64_copy(conv)
    expected_x = x.detach().double().requires_grad_()
    expected = reference_depthwise(expected_conv, expected_x, residual)
    params = [expected_x, expected_conv.weight, expected_conv.bias]
    return expected, torch.autograd.grad(expected, params, grad.double())


@pytest.mark.parametrize('mode', ['inference', 'train', 'backward_in_autocast'])
@pytest.mark.parametrize('kernel_size, residual', [(3, True), (5, False)])
@pytest.mark.parametrize('dtype', HALF_DTYPES, ids=['bfloat16', 'float16'])
def test_autocast_depthwise_runs_in_float32(backend, onednn_half, dtype, kernel_size, residual, mode):
    # A float32 model's depthwise conv of a half-precision map (as autocast's linears give) under CPU autocast
    # returns what F.conv2d does there, in the autocast dtype. In float32 it is float32's result rounded once,
    # the map's gradient has the map's dtype and the parameters' are float32 and float32-accurate, also with
    # the backward run inside autocast. Where oneDNN convolves half precision, only the backward of kernels
    # above 3x3 is upcast, and the rest is F.conv2d's own result.
    conv = nn.Conv2d(24, 24, kernel_size, padding=kernel_size // 2, groups=24)
    x = torch.randn(2, 9, 11, 24).to(dtype).requires_grad_(mode != 'inference')
    grad = torch.randn(2, 9, 11, 24).to(dtype)
    expected, expected_grads = float64_reference(conv, x, grad, residual)
    with torch.set_grad_enabled(mode != 'inference'), torch.autocast('cpu', dtype=dtype):
        plain = reference_depthwise(conv, x, residual)
        nchw = x.permute(0, 3, 1, 2)
        chosen = dispatch.choose_backend('depthwise_precision', nchw, conv.weight, mode != 'inference')
        reasons = dispatch.why_not('depthwise_precision', nchw, conv.weight, mode != 'inference')
        out = depthwise_nhwc(conv, x, residual)
        if mode == 'backward_in_autocast':
            grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)
    if mode == 'train':
        grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)
    upcast = not onednn_half or (mode != 'inference' and kernel_size > 3)
    assert chosen == ('float32' if upcast else 'native'), reasons
    assert out.dtype == plain.dtype == dtype
    if not upcast:
        assert 'oneDNN convolves' in reasons['float32'][0]
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        return
    assert_rounded(out, expected, dtype)
    if mode == 'inference':
        return
    assert_rounded(grads[0], expected_grads[0], dtype)
    for got, want in zip(grads[1:], expected_grads[1:]):
        assert got.dtype == torch.float32
        assert_float32_close(got, want, terms=2 * 9 * 11)


@pytest.mark.parametrize('kernel_size, residual', [(3, True), (5, False)])
@pytest.mark.parametrize('dtype', HALF_DTYPES, ids=['bfloat16', 'float16'])
def test_half_model_depthwise_runs_in_float32(backend, onednn_half, dtype, kernel_size, residual):
    # A model held in half precision, without autocast: output and every gradient in its dtype, each float32's
    # result rounded once where upcast; F.conv2d's own where oneDNN convolves half precision (3x3).
    conv = nn.Conv2d(24, 24, kernel_size, padding=kernel_size // 2, groups=24).to(dtype)
    x = torch.randn(2, 9, 11, 24).to(dtype).requires_grad_()
    grad = torch.randn(2, 9, 11, 24).to(dtype)
    expected, expected_grads = float64_reference(conv, x, grad, residual)
    out = depthwise_nhwc(conv, x, residual)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], grad)
    chosen = dispatch.choose_backend('depthwise_precision', x.permute(0, 3, 1, 2), conv.weight, True)
    if onednn_half and kernel_size == 3:
        assert chosen == 'native'
        plain = reference_depthwise(conv, x, residual)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        for got, want in zip(grads, torch.autograd.grad(plain, [x, conv.weight, conv.bias], grad)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        return
    assert chosen == 'float32'
    assert_rounded(out, expected, dtype)
    for got, want in zip(grads, expected_grads):
        assert_rounded(got, want, dtype)


@pytest.mark.parametrize('dtype', HALF_DTYPES, ids=['bfloat16', 'float16'])
def test_autocast_gelu_depthwise_and_its_grads(backend, onednn_half, dtype):
    # The FFN's GELU + residual 3x3 under autocast, with autograd and as gradients without autograd state (the
    # FFN recomputation's): the dtypes of the plain path (the map's and its gradient's the autocast dtype, the
    # parameters' gradients float32) and, where upcast, GELU and the conv in float32.
    conv = nn.Conv2d(40, 40, 3, padding=1, groups=40)
    x = (2 * torch.randn(2, 9, 13, 40)).to(dtype)
    grad = torch.randn(2, 9, 13, 40).to(dtype)
    expected_conv = float64_copy(conv)
    expected_x = x.double().requires_grad_()
    expected = reference_depthwise(expected_conv, F.gelu(expected_x), True)
    params = [expected_x, expected_conv.weight, expected_conv.bias]
    expected_grads = torch.autograd.grad(expected, params, grad.double())
    with torch.autocast('cpu', dtype=dtype):
        results = gelu_depthwise_grads(conv, x, grad, residual=True)
        auto_x = x.clone().requires_grad_()
        out = gelu_depthwise_nhwc(conv, auto_x, True)
    grads = torch.autograd.grad(out, [auto_x, conv.weight, conv.bias], grad)
    positions = 2 * 9 * 13
    assert [t.dtype for t in grads] == [dtype, torch.float32, torch.float32] and out.dtype == dtype
    assert [t.dtype for t in results[:3]] + [results[4].dtype] == [dtype, torch.float32, torch.float32, dtype]
    if onednn_half:  # 3x3: the half-precision path
        return
    assert results[3].dtype == torch.float32  # the channel sums, in the parameters' dtype
    for got in (out, results[4]):
        assert_rounded(got, expected, dtype)
    for got_x, got_weight, got_bias in (grads, results[:3]):
        assert_rounded(got_x, expected_grads[0], dtype)
        assert_float32_close(got_weight, expected_grads[1], terms=positions)
        assert_float32_close(got_bias, expected_grads[2], terms=positions)
    # Float32 sums of the input gradient (without the kernel, of its rounded values).
    expected_sums = expected_grads[0].sum((0, 1, 2))
    torch.testing.assert_close(results[3].double(), expected_sums, atol=1e-5 * expected_sums.abs().max().item(),
                               rtol=torch.finfo(dtype).eps * positions ** 0.5)


def test_depthwise_precision_says_why_not_float32():
    weight = torch.randn(8, 1, 5, 5)
    x = torch.randn(1, 8, 6, 6)
    assert dispatch.choose_backend('depthwise_precision', x, weight, True) == 'native'
    assert 'no bfloat16 or float16' in dispatch.why_not('depthwise_precision', x, weight, True)['float32'][0]
    assert dispatch.choose_backend('depthwise_precision', x.bfloat16(), weight, True) == 'float32'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert dispatch.choose_backend('depthwise_precision', x, weight, True) == 'float32'
        assert 'float64' in dispatch.why_not('depthwise_precision', x.double(), weight.double(), True)['float32'][0]
        # Only CPU tensors: cuDNN convolves half precision fast (meta tensors stand in for CUDA's here).
        meta = dispatch.why_not('depthwise_precision', x.to('meta'), weight.to('meta'), True)['float32']
        assert 'not on the CPU' in meta[0]
