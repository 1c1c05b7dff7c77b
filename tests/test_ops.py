"""The CPU kernels behind the backbone (depthwise convolution, alone and of GELU's output, forward and one-pass
backward, compiled and PyTorch; the compiled and the chunked cluster attention; the 1x1-convolution form of the
projections, with its backward, alone and after the pre-norm; v's copy for the LePE branch, whose gradient
joins the packed one in place; residual branches with stochastic depth), each against PyTorch's, mmcv's or a
float64 implementation."""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn.bricks.drop import drop_path as mmcv_drop_path

from mmsecvit import SecViT
from mmsecvit.models.compiled import _kernels, kernel_available
from mmsecvit.models.depthwise_conv import (depthwise_nhwc, depthwise_weight_grad, gelu_depthwise_grads,
                                            gelu_depthwise_nhwc)
from mmsecvit.models.sec_attention import apply_rope, rope_angles, rope_tables, split_values
from mmsecvit.models.secvit import linear_nhwc, norm_linear_nhwc, residual_add

sec_attention_module = importlib.import_module('mmsecvit.models.sec_attention')
depthwise_conv_module = importlib.import_module('mmsecvit.models.depthwise_conv')

NO_KERNEL = 'the compiled kernel needs an x86-64 CPU with AVX-512'
needs_kernel = pytest.mark.skipif(not kernel_available(), reason=NO_KERNEL)


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


@pytest.mark.parametrize('compiled', [True, False], ids=['compiled', 'pytorch'])
@pytest.mark.parametrize('batch, channels, height, width, kernel_size',
                         [(1, 64, 37, 53, 5), (2, 70, 9, 11, 3), (2, 20, 7, 5, 5), (1, 17, 3, 2, 5), (1, 6, 4, 4, 3)])
def test_depthwise_weight_grad_float32_tolerance(compiled, batch, channels, height, width, kernel_size):
    # Channel counts that are not multiples of 16 and maps smaller than the kernel included.
    if compiled and not kernel_available():
        pytest.skip(NO_KERNEL)
    shape = (batch, channels, height, width)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    expected = torch.nn.grad.conv2d_weight(x.double(), (channels, 1, kernel_size, kernel_size), grad.double(),
                                           padding=kernel_size // 2, groups=channels)
    if compiled:
        weight = torch.randn(channels, 1, kernel_size, kernel_size)
        result = _kernels.depthwise_backward(x.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1), weight,
                                             input_grad=False)[1]
    else:
        result = depthwise_weight_grad(x, grad, kernel_size)
    assert result.shape == expected.shape
    assert (result.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def float64_depthwise(x, weight, bias, gelu):
    """Reference: (B, H, W, C) float64 depthwise convolution of x or of gelu(x), with gradients."""
    x, weight = x.double(), weight.double()
    bias = None if bias is None else bias.double()
    return F.conv2d((F.gelu(x) if gelu else x).permute(0, 3, 1, 2), weight, bias, padding=weight.shape[-1] // 2,
                    groups=weight.shape[0]).permute(0, 2, 3, 1)


def assert_float32_close(got, want):
    """Float32 results against a float64 reference: within 1e-5 of it, relative to its largest magnitude
    where that is above 1 (sums over many positions)."""
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * max(1.0, want.abs().max().item()))


KERNEL_CASES = [(2, 7, 9, 20, 3), (1, 1, 1, 16, 5), (1, 3, 2, 33, 5), (2, 13, 17, 64, 5), (1, 6, 11, 48, 3),
                (3, 10, 12, 40, 3)]


@needs_kernel
@pytest.mark.parametrize('gelu', [False, True])
@pytest.mark.parametrize('batch, height, width, channels, kernel_size', KERNEL_CASES)
def test_depthwise_kernels_equal_float64(batch, height, width, channels, kernel_size, gelu):
    # Channel counts that are not multiples of 16, maps smaller than the kernel, batches, with and without
    # GELU on the input: the forward, and every gradient of the one-pass backward.
    x = 2 * torch.randn(batch, height, width, channels)
    weight = torch.randn(channels, 1, kernel_size, kernel_size)
    bias = torch.randn(channels)
    grad = torch.randn(batch, height, width, channels)
    reference = [t.double().requires_grad_() for t in (x, weight, bias)]
    expected = float64_depthwise(*reference, gelu)
    expected_grads = torch.autograd.grad(expected, reference, grad.double())
    result = _kernels.depthwise_forward(x, weight, bias, gelu)
    assert result.is_contiguous() and result.shape == x.shape
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_kernels.depthwise_forward(x, weight, None, gelu).double(), expected - bias.double(),
                               rtol=0, atol=1e-5)
    grad_x, grad_weight, grad_bias, grad_sum, output = _kernels.depthwise_backward(x, grad, weight, gelu)
    for got, want in zip((grad_x, grad_weight, grad_bias), expected_grads):
        assert_float32_close(got, want)
    if gelu:  # the input gradient's channel sums
        assert_float32_close(grad_sum, expected_grads[0].sum((0, 1, 2)))
    else:
        assert grad_sum is None
    assert output is None
    # On request, the forward's output too (the same rows, from the backward's pass).
    again = _kernels.depthwise_backward(x, grad, weight, gelu, bias=bias, with_output=True)
    torch.testing.assert_close(again[4], result, rtol=0, atol=0)
    torch.testing.assert_close(again[1], grad_weight, rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize('gelu', [False, True])
def test_depthwise_kernels_read_strided_positions(gelu):
    # A channel slice of a wider tensor (e.g. v of packed q/k/v): positions are 3 * C apart.
    wide, wide_grad = torch.randn(2, 9, 10, 3 * 48), torch.randn(2, 9, 10, 3 * 48)
    x, grad = wide[..., 96:], wide_grad[..., :48]
    weight = torch.randn(48, 1, 5, 5)
    reference = [x.double().requires_grad_(), weight.double().requires_grad_()]
    expected = float64_depthwise(*reference, None, gelu)
    torch.testing.assert_close(_kernels.depthwise_forward(x, weight, None, gelu).double(), expected, rtol=0, atol=1e-5)
    result = _kernels.depthwise_backward(x, grad, weight, gelu)
    for got, want in zip(result, torch.autograd.grad(expected, reference, grad.double())):
        assert_float32_close(got, want)


@needs_kernel
def test_depthwise_kernels_check_their_inputs():
    x = torch.randn(1, 8, 8, 16)
    weight = torch.randn(16, 1, 3, 3)
    with pytest.raises(RuntimeError, match='kernel_size must be 3 or 5'):
        _kernels.depthwise_forward(x, torch.randn(16, 1, 7, 7))
    with pytest.raises(RuntimeError, match='kernel_size must be 3 or 5'):
        _kernels.depthwise_backward(x, x, torch.randn(16, 1, 7, 7))
    with pytest.raises(RuntimeError, match='contiguous channels'):
        _kernels.depthwise_forward(x.transpose(2, 3), torch.randn(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='C = 16'):
        _kernels.depthwise_forward(x, torch.randn(8, 1, 3, 3))
    with pytest.raises(RuntimeError, match='bias must be'):
        _kernels.depthwise_forward(x, weight, torch.randn(8))
    with pytest.raises(RuntimeError, match="input's shape"):
        _kernels.depthwise_backward(x, x[:, :4], weight)
    with pytest.raises(RuntimeError, match='contiguous channels'):
        _kernels.depthwise_backward(x, x.transpose(2, 3), weight)


@pytest.mark.parametrize('kernel_size', [3, 5])
def test_inference_depthwise_conv_uses_the_compiled_kernel(kernel_size, monkeypatch):
    # The no-grad path takes the compiled kernel (where built) for 3x3 kernels on every map and for 5x5 up to
    # KERNEL_MAX_VALUES_5X5; either way it equals PyTorch's convolution, with the residual folded in.
    calls = []
    if kernel_available():
        monkeypatch.setattr(depthwise_conv_module, '_kernels', type('Spy', (), {
            'depthwise_forward': staticmethod(lambda *args: calls.append(1) or _kernels.depthwise_forward(*args))}))
    conv = nn.Conv2d(32, 32, kernel_size, padding=kernel_size // 2, groups=32)
    x = torch.randn(1, 14, 14, 32)
    with torch.no_grad():
        for residual in (False, True):
            torch.testing.assert_close(depthwise_nhwc(conv, x, residual), reference_depthwise(conv, x, residual))
        assert len(calls) == (2 if kernel_available() else 0)
        monkeypatch.setattr(depthwise_conv_module, 'KERNEL_MAX_VALUES_5X5', x.numel() - 1)
        torch.testing.assert_close(depthwise_nhwc(conv, x), reference_depthwise(conv, x, False))
        # Larger maps stay with oneDNN for 5x5 kernels.
        assert len(calls) == (3 if kernel_available() and kernel_size == 3 else 2 if kernel_available() else 0)


@pytest.mark.parametrize('compiled', [True, False], ids=['compiled', 'pytorch'])
@pytest.mark.parametrize('residual', [False, True])
def test_gelu_depthwise_equals_gelu_then_conv(compiled, residual, monkeypatch):
    # The FFN's GELU and depthwise conv, in inference, with autograd, and as gradients without autograd state
    # (what the FFN recomputation uses), against float64 GELU + conv; also with a frozen weight and no bias.
    if compiled and not kernel_available():
        pytest.skip(NO_KERNEL)
    monkeypatch.setattr(depthwise_conv_module, 'kernel_available', lambda: compiled)
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
    for got, want in zip(torch.autograd.grad(out, [x, conv.weight, conv.bias], grad), expected_grads):
        assert_float32_close(got, want)
    results = gelu_depthwise_grads(conv, x.detach(), grad, residual)
    for got, want in zip(results, expected_grads + (expected_grads[0].sum((0, 1, 2)), expected.detach())):
        assert_float32_close(got, want)
    frozen = nn.Conv2d(40, 40, 3, padding=1, groups=40, bias=False).requires_grad_(False)
    grad_x, grad_weight, grad_bias, _, _ = gelu_depthwise_grads(frozen, x.detach(), grad, residual)
    assert grad_bias is None and (grad_weight is None) != compiled  # the compiled pass gives the weight's anyway
    with torch.enable_grad():
        reference = reference_depthwise(frozen.double(), F.gelu(reference_x), residual)
    assert_float32_close(grad_x, torch.autograd.grad(reference, reference_x, grad.double())[0])


def test_depthwise_falls_back_outside_its_case():
    # Strided convolutions and inference use PyTorch's convolution unchanged.
    strided = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
    x = torch.randn(1, 8, 8, 4, requires_grad=True)
    out = depthwise_nhwc(strided, x)
    assert out.shape == (1, 4, 4, 4) and 'DepthwiseConv' not in type(out.grad_fn.next_functions[0][0]).__name__
    with torch.no_grad():
        torch.testing.assert_close(depthwise_nhwc(strided, x), strided(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def cpu_has_avx512():
    with open('/proc/cpuinfo') as cpuinfo:
        flags = next((line.split() for line in cpuinfo if line.startswith('flags')), [])
    return 'avx512f' in flags and 'avx512dq' in flags


def test_kernel_is_built_where_the_cpu_supports_it():
    # setup builds mmsecvit._kernels; on a CPU with AVX-512 it must be there and usable.
    if cpu_has_avx512():
        assert _kernels is not None, 'mmsecvit._kernels is not built: rerun make setup'
        assert kernel_available()


@pytest.mark.parametrize('impl', ['kernel', 'chunked'])
@pytest.mark.parametrize('batch, tokens, heads, head_dim, cluster_len',
                         [(2, 1000, 4, 32, 98), (1, 999, 3, 32, 100), (2, 50, 2, 16, 7), (1, 300, 2, 16, 256),
                          (1, 17, 1, 32, 1)])
def test_cluster_attention_equals_fused_kernel(impl, batch, tokens, heads, head_dim, cluster_len, monkeypatch):
    if impl == 'kernel' and not kernel_available():
        pytest.skip(NO_KERNEL)
    # A small chunk so that the chunked path runs several chunks, the shorter last cluster included.
    monkeypatch.setattr(sec_attention_module, 'CHUNK_SCORES', 3 * cluster_len * cluster_len)
    packed = torch.randn(batch, tokens, heads, 3, head_dim)
    packed[:, :, :, 1] *= head_dim ** -0.5  # keys carry the softmax scale, as in the model
    packed.requires_grad_()
    grad = torch.randn(batch, tokens, heads * head_dim)
    results = []
    for name in (impl, 'fused'):
        out = sec_attention_module.sec_attention(packed, cluster_len, impl=name)
        results.append((out, *torch.autograd.grad(out, packed, grad)))
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize('impl', ['kernel', 'chunked'])
@pytest.mark.parametrize('batch, height, width, heads, head_dim, cluster_len',
                         [(2, 30, 33, 4, 32, 98), (1, 7, 11, 2, 16, 10), (1, 9, 8, 3, 32, 72)])
def test_attention_with_rope_tables_equals_rotating_first(impl, batch, height, width, heads, head_dim, cluster_len):
    # Given the rotary tables, the kernel rotates each cluster's copy of the rows and takes the rotation back
    # out of the gradient; the other paths rotate the packed tensor first. Both must equal the fused kernel on
    # rows rotated beforehand, gradients included.
    if impl == 'kernel' and not kernel_available():
        pytest.skip(NO_KERNEL)
    rope = rope_tables(height, width, rope_angles(head_dim), key_scale=head_dim ** -0.5)
    packed = torch.randn(batch, height * width, heads, 3, head_dim, requires_grad=True)
    grad = torch.randn(batch, height * width, heads * head_dim)
    out = sec_attention_module.sec_attention(packed, cluster_len, impl=impl, rope=rope)
    expected = sec_attention_module.sec_attention(apply_rope(packed, rope), cluster_len, impl='fused')
    assert (out - expected).abs().max() <= 1e-5
    for a, b in zip(torch.autograd.grad(out, packed, grad), torch.autograd.grad(expected, packed, grad)):
        assert (a - b).abs().max() <= 1e-5


@needs_kernel
def test_kernel_checks_its_rope_arguments():
    rows, sources = torch.randn(2 * 4 * 5 * 3, 96), torch.randperm(2 * 4 * 5 * 3)
    axes = rope_tables(4, 5, rope_angles(32)).axes
    assert _kernels.forward(rows, sources, [0, 12, 10], axes, 3, 4, 5, 0.5).shape == (120, 32)
    with pytest.raises(RuntimeError, match='height \\* width \\* heads'):
        _kernels.forward(rows, sources, [0, 12, 10], axes, 4, 4, 5, 0.5)
    with pytest.raises(RuntimeError, match='\\(height \\+ width, 2, head_dim / 2\\)'):
        _kernels.forward(rows, sources, [0, 12, 10], rope_tables(4, 6, rope_angles(32)).axes, 3, 4, 5, 0.5)
    with pytest.raises(RuntimeError, match='\\(height \\+ width, 2, head_dim / 2\\)'):
        _kernels.backward(rows, sources, [0, 12, 10], torch.randn(120, 32), rope_tables(4, 5, rope_angles(16)).axes,
                          3, 4, 5, 0.5)
    with pytest.raises(RuntimeError, match='height \\* width must be the token count'):
        _kernels.semantic_order(rows, 2, 20, 3, axes, 5, 5)


@needs_kernel
def test_kernel_checks_its_inputs():
    rows, sources = torch.randn(20, 96), torch.randperm(20)
    assert _kernels.forward(rows, sources, [0, 2, 10]).shape == (20, 32)
    with pytest.raises(RuntimeError, match='head_dim 16 or 32'):
        _kernels.forward(torch.randn(20, 48 * 3), sources, [0, 2, 10])
    with pytest.raises(RuntimeError, match='contiguous'):
        _kernels.forward(torch.randn(96, 20).t(), sources, [0, 2, 10])
    with pytest.raises(RuntimeError, match='cluster length'):
        _kernels.forward(torch.randn(300, 96), torch.randperm(300), [0, 1, 300])
    with pytest.raises(RuntimeError, match='past the rows'):
        _kernels.forward(rows, sources, [0, 3, 10])
    with pytest.raises(RuntimeError, match='cover every row'):
        _kernels.forward(rows, sources, [0, 1, 10])
    with pytest.raises(RuntimeError, match='follow each other'):
        _kernels.forward(rows, sources, [0, 1, 10, 12, 1, 8])
    with pytest.raises(ValueError, match='choose one of'):
        sec_attention_module.sec_attention(torch.randn(1, 20, 2, 3, 32), 10, impl='flash')


def test_attention_impl_picks_the_fastest_for_the_input():
    packed = torch.randn(1, 300, 2, 3, 32)
    impl = sec_attention_module.attention_impl
    assert impl(packed, 98) == ('kernel' if kernel_available() else 'chunked')
    assert impl(packed.double(), 98) == 'chunked'
    assert impl(torch.randn(1, 300, 1, 3, 64), 98) == 'chunked'  # head_dim the kernel does not cover
    assert impl(packed, sec_attention_module.MAX_CHUNKED_CLUSTER + 1) == 'fused'
    assert impl(packed.bfloat16(), 98) == 'fused'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert impl(packed, 98) == 'fused'


@pytest.mark.parametrize('used', ['both', 'rotated', 'values'])
def test_split_values_backward_equals_plain_autograd(used):
    rope = rope_tables(4, 5, rope_angles(8).double(), key_scale=8 ** -0.5)
    packed = torch.randn(2, 20, 3, 3, 8, dtype=torch.float64, requires_grad=True)
    kept, values = split_values(packed)
    rotated = apply_rope(kept, rope)  # as the attention's PyTorch paths use it
    assert values.shape == (2, 20, 24) and values.is_contiguous()
    pairs = packed.unflatten(-1, (-1, 2))
    plain_rotated = torch.view_as_real(torch.view_as_complex(pairs) * rope.complex).flatten(-2)
    plain_values = packed[:, :, :, 2].reshape(2, 20, 24)
    torch.testing.assert_close(rotated, plain_rotated, rtol=0, atol=0)
    torch.testing.assert_close(values, plain_values, rtol=0, atol=0)
    weights = torch.randn_like(rotated), torch.randn_like(values)

    def loss(rotated, values):  # an output left out gets no gradient at all (None in the backward)
        terms = [(rotated * weights[0]).sum()] if used != 'values' else []
        return sum(terms + ([(values * weights[1]).sum()] if used != 'rotated' else []))

    (grad,) = torch.autograd.grad(loss(rotated, values), packed)
    (plain_grad,) = torch.autograd.grad(loss(plain_rotated, plain_values), packed)
    torch.testing.assert_close(grad, plain_grad)


def test_rope_kernel_table_holds_the_complex_rotations():
    rope = rope_tables(3, 5, rope_angles(16), key_scale=0.25)
    axes = rope.axes  # (height + width, 2, 8): per row, then per column, the cosines of 8 channels, then sines
    assert axes.shape == (8, 2, 8) and axes.dtype == torch.float32
    rotation = rope.complex[:, 0, 0].view(3, 5, 8)  # q's rotation per token: 4 pairs by row, 4 by column
    for y in range(3):
        for x in range(5):
            table = torch.cat([axes[y], axes[3 + x]], dim=-1)  # (cos, signed sin) of the 16 channels
            torch.testing.assert_close(table[0, 0::2], rotation[y, x].real)
            torch.testing.assert_close(table[0, 1::2], table[0, 0::2])
            torch.testing.assert_close(table[1, 1::2], rotation[y, x].imag)
            torch.testing.assert_close(table[1, 0::2], -rotation[y, x].imag)
    torch.testing.assert_close(rope.complex[:, 0, 1], rope.complex[:, 0, 0] * 0.25)
    assert (rope.complex[:, 0, 2] == 1).all()


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


def test_inference_reuses_derived_weights_until_parameters_change():
    model, other = SecViT('tiny', cluster_size=16).eval(), SecViT('tiny', cluster_size=16).eval()
    x = torch.randn(1, 3, 64, 64)
    attn, cpe = model.stages[0].blocks[0].attn, model.stages[0].blocks[0].cpe
    with torch.no_grad():
        before = model(x)
        kept = [attn.qkv._reused_without_grad['per_head'][1][0], cpe._reused_without_grad['residual'][1]]
        model(x)
        assert kept == [attn.qkv._reused_without_grad['per_head'][1][0], cpe._reused_without_grad['residual'][1]]
        # load_state_dict and in-place updates (as an optimizer step makes) are both picked up.
        model.load_state_dict(other.state_dict())
        loaded, expected = model(x), other(x)
        for param in (*model.parameters(), *other.parameters()):
            param.mul_(1.5)
        updated, expected_updated = model(x), other(x)
    for a, b, c, d, e in zip(before, loaded, expected, updated, expected_updated):
        assert not torch.allclose(a, b)
        torch.testing.assert_close(b, c)
        torch.testing.assert_close(d, e)


@pytest.mark.parametrize('shape', [(2, 3, 5000), (1, 2, 70000)])
def test_radix_ranking_equals_argsort(shape):
    assert shape[-1] >= sec_attention_module.RADIX_SORT_MIN_TOKENS  # the integer-key path
    scores = torch.randn(shape)
    scores[..., :300] = 0.0  # ties, and signed zeros
    scores[..., 300:400] = -0.0
    scores[..., 400:500] *= 1e-40  # subnormals of both signs
    scores[..., 500], scores[..., 501] = float('inf'), float('-inf')
    order = sec_attention_module.argsort_rows(scores)
    torch.testing.assert_close(scores.gather(-1, order), scores.sort(dim=-1).values, rtol=0, atol=0)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(shape[-1]).expand(shape))


def exact_key_scores(packed):
    """Cosine of every key to the keys' sum, in float64: (B, heads, N)."""
    k = packed[:, :, :, 1].double()
    return torch.einsum('bnhd,bhd->bhn', k, k.sum(dim=1)) / k.norm(dim=-1).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize('batch, tokens, heads, head_dim', [(1, 67200, 2, 32), (2, 4200, 8, 32), (3, 49, 4, 16),
                                                            (1, 1, 2, 16)])
def test_ranking_kernel_sorts_by_the_exact_scores(batch, tokens, heads, head_dim):
    packed = torch.randn(batch, tokens, heads, 3, head_dim)
    order = _kernels.semantic_order(packed.reshape(-1, 3 * head_dim), batch, tokens, heads)
    assert torch.equal(order.sort(dim=-1).values, torch.arange(tokens).expand(batch, heads, tokens))
    ranked = exact_key_scores(packed).gather(-1, order)
    # Ranked within float32 rounding of the scores (whose scale is the centre's length, not 1).
    scale = packed[:, :, :, 1].double().sum(dim=1).norm(dim=-1)[..., None]
    assert ((ranked[..., :-1] - ranked[..., 1:]) / scale <= 1e-6).all()
    # Equal to PyTorch's ranking except for near-ties.
    assert (order != sec_attention_module.argsort_rows(exact_key_scores(packed).float())).float().mean() < 0.01


@needs_kernel
@pytest.mark.parametrize('batch, height, width, heads, head_dim', [(1, 200, 336, 2, 32), (2, 7, 9, 4, 16)])
def test_ranking_kernel_rotates_the_keys_it_is_given_unrotated(batch, height, width, heads, head_dim):
    rope = rope_tables(height, width, rope_angles(head_dim), key_scale=head_dim ** -0.5)
    packed = torch.randn(batch, height * width, heads, 3, head_dim)
    rows = packed.reshape(-1, 3 * head_dim)
    order = _kernels.semantic_order(rows, batch, height * width, heads, rope.axes, height, width)
    rotated = apply_rope(packed.clone(), rope)
    ranked = exact_key_scores(rotated).gather(-1, order)
    scale = rotated[:, :, :, 1].double().sum(dim=1).norm(dim=-1)[..., None]
    assert ((ranked[..., :-1] - ranked[..., 1:]) / scale <= 1e-6).all()
    unrotated_order = _kernels.semantic_order(rows, batch, height * width, heads)
    assert (order != unrotated_order).float().mean() > 0.5  # the rotation matters


@needs_kernel
def test_ranking_kernel_keeps_token_order_between_equal_scores():
    packed = torch.randn(1, 50, 2, 3, 16)
    packed[:, 10:20, :, 1] = packed[:, 5:6, :, 1]  # eleven equal keys
    order = _kernels.semantic_order(packed.reshape(-1, 48), 1, 50, 2)
    for row in order[0]:
        tied = row[(row >= 10) & (row < 20) | (row == 5)]
        assert torch.equal(tied, tied.sort().values)


@needs_kernel
def test_ranking_kernel_checks_its_inputs():
    rows = torch.randn(2 * 7 * 3, 96)
    with pytest.raises(RuntimeError, match='batch \\* tokens \\* heads rows'):
        _kernels.semantic_order(rows, 2, 7, 4)
    with pytest.raises(RuntimeError, match='head_dim 16 or 32'):
        _kernels.semantic_order(torch.randn(42, 24), 2, 7, 3)
    with pytest.raises(RuntimeError, match='contiguous'):
        _kernels.semantic_order(rows.t(), 2, 7, 3)
