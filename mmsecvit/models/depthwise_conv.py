"""Depthwise convolution on (B, H, W, C) tensors, alone or of the GELU of its input, with compiled CPU kernels.

On the CPU, PyTorch's depthwise convolution backward (oneDNN) takes about eight times as long as the
forward for the input gradient, and a 5x5 kernel's weight gradient is slower still; the FFN's GELU before
its depthwise convolution costs two more passes over the largest activations each way. The compiled
kernels (mmsecvit/csrc/depthwise.cpp, float32 3x3 and 5x5) do the forward, with or without GELU, in one
pass, and the whole backward (input, weight and bias gradients, and GELU's) in another. Without them, the
input gradient of a stride-1 "same" depthwise convolution is the same convolution with the kernel
flipped, and the weight gradient comes from 3x3 weight gradients (the fast oneDNN case) of shifted windows
of the padded input.
"""
import torch
import torch.nn.functional as F

from .compiled import _kernels, kernel_available
from .reuse import reuse_without_grad


def _weight_grad_3x3(x, grad, channels, padding):
    """Weight gradient of a 3x3 depthwise convolution (``x`` and ``grad`` NCHW, any layout)."""
    return torch.ops.aten.convolution_backward(
        grad, x, x.new_empty(channels, 1, 3, 3), None, [1, 1], [padding, padding], [1, 1], False, [0, 0],
        channels, [False, True, False])[1]


def depthwise_weight_grad(x, grad, kernel_size):
    """Gradient of a stride-1, zero-padded ("same") depthwise convolution's weight, with PyTorch operations
    (the compiled backward computes it with the other gradients): 3x3 from oneDNN, larger kernels assembled
    from 3x3 weight gradients of shifted windows.

    Args:
        x (Tensor): Convolution input, (B, C, H, W).
        grad (Tensor): Gradient of the output, (B, C, H, W).
        kernel_size (int): Odd kernel size k.

    Returns:
        Tensor: (C, 1, k, k).
    """
    channels = x.shape[1]
    if kernel_size == 3:
        return _weight_grad_3x3(x, grad, channels, 1)
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad)).contiguous(memory_format=torch.channels_last)
    height, width = x.shape[2:]
    weight = x.new_empty(channels, 1, kernel_size, kernel_size)
    # 3x3 windows whose union is the k x k kernel (overlapping taps are computed twice, identically).
    starts = sorted(set(range(0, kernel_size - 2, 3)) | {kernel_size - 3})
    for row in starts:
        for col in starts:
            window = padded[:, :, row:row + height + 2, col:col + width + 2]
            weight[:, :, row:row + 3, col:col + 3] = _weight_grad_3x3(window, grad, channels, 0)
    return weight


def _nhwc(x):
    """(B, H, W, C) view of an NCHW tensor, copied where its channels are not contiguous."""
    x = x.permute(0, 2, 3, 1)
    return x if x.stride(3) == 1 else x.contiguous()


def _kernel_fits(x, weight):
    """Whether the compiled kernels take this NCHW input and (C, 1, k, k) weight: float32 on a CPU they run
    on, 3x3 or 5x5, outside autocast and traced graphs (FLOP counting)."""
    return (weight.shape[-1] in (3, 5) and x.device.type == 'cpu' and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and not torch.jit.is_tracing() and kernel_available())


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 "same" depthwise convolution of a channels-last NCHW ``x`` or, with ``gelu`` (compiled kernel
    only), of ``gelu(x)``, whose output is then never stored. The backward is the compiled one or, without
    it, a flipped-kernel convolution for the input gradient and :func:`depthwise_weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias, gelu=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.gelu = bias is not None, gelu
        if gelu:
            return _kernels.depthwise_forward(x.permute(0, 2, 3, 1), weight, bias, True).permute(0, 3, 1, 2)
        return _same_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needed = ctx.needs_input_grad
        if ctx.gelu or (_kernel_fits(x, weight) and grad.dtype == torch.float32):
            grad_x, grad_weight, grad_bias, *_ = _kernels.depthwise_backward(
                _nhwc(x), _nhwc(grad), weight, ctx.gelu, needed[0])
            return (None if grad_x is None else grad_x.permute(0, 3, 1, 2), grad_weight if needed[1] else None,
                    grad_bias if ctx.has_bias and needed[2] else None, None)
        kernel_size = weight.shape[-1]
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if needed[0]:
            grad_x = _same_conv(grad, weight.flip(2, 3), None)
        if needed[1]:
            grad_weight = depthwise_weight_grad(x, grad, kernel_size)
        if ctx.has_bias and needed[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def _is_same_depthwise(conv):
    """Whether ``conv`` is a stride-1 "same" depthwise convolution with an odd square kernel."""
    kernel_size = conv.kernel_size[0]
    return (kernel_size % 2 == 1 and conv.kernel_size == (kernel_size, kernel_size)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (kernel_size // 2,) * 2
            and conv.groups == conv.in_channels == conv.out_channels)


def _use_fast_backward(conv, x, weight):
    """The custom backward covers CPU float32/float64 "same" stride-1 depthwise convolutions with odd
    square kernels, outside autocast, when a gradient is recorded."""
    return (x.device.type == 'cpu' and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and not torch.is_autocast_enabled('cpu') and x.dtype in (torch.float32, torch.float64)
            and _is_same_depthwise(conv))


def _add_identity(weight):
    """Depthwise kernel plus the identity (1 at the centre tap): ``conv(x) + x`` as one convolution."""
    identity = torch.zeros_like(weight)
    identity[:, :, weight.shape[2] // 2, weight.shape[3] // 2] = 1
    return weight + identity


# Largest input (values) for which the compiled 5x5 convolution is used; above it oneDNN's is faster. The
# compiled 3x3 convolution is as fast or faster than oneDNN's on every map of this model.
KERNEL_MAX_VALUES_5X5 = 2 ** 19


def _same_conv(x, weight, bias):
    """Stride-1 "same" depthwise convolution of a channels-last NCHW ``x``.

    Where the compiled kernel fits (:func:`_kernel_fits`; for 5x5 kernels, maps of at most
    ``KERNEL_MAX_VALUES_5X5`` values) it runs the convolution, which also skips oneDNN's fixed cost per call
    on small maps: 0.99-2.6x as fast as oneDNN (median 1.5x) on this model's maps at 224 px. Elsewhere it is
    ``F.conv2d``.
    """
    if (_kernel_fits(x, weight) and x.stride(1) == 1
            and (weight.shape[-1] == 3 or x.numel() <= KERNEL_MAX_VALUES_5X5)):
        return _kernels.depthwise_forward(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, weight.shape[0])


def _conv_weight(conv, residual):
    """The convolution's weight, plus the identity with ``residual`` (see :func:`_add_identity`)."""
    return reuse_without_grad(conv, 'residual', _add_identity, conv.weight) if residual else conv.weight


def depthwise_nhwc(conv, x, residual=False):
    """Apply a stride-1 "same" depthwise nn.Conv2d to a (B, H, W, C) tensor through its channels-last
    NCHW view; returns (B, H, W, C).

    With ``residual``, returns ``x + conv(x)`` in one convolution by adding 1 to the kernel's centre tap.
    """
    weight = _conv_weight(conv, residual)
    x = x.permute(0, 3, 1, 2)
    if _use_fast_backward(conv, x, weight):
        out = _DepthwiseConv.apply(x, weight, conv.bias)
    elif not torch.is_grad_enabled() and _is_same_depthwise(conv):
        out = _same_conv(x, weight, conv.bias)
    else:
        out = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.permute(0, 2, 3, 1)


def _gelu_kernel_fits(conv, x, weight):
    return _is_same_depthwise(conv) and x.stride(1) == 1 and _kernel_fits(x, weight)


def gelu_depthwise_nhwc(conv, x, residual=False, inplace=False):
    """``depthwise_nhwc(conv, gelu(x), residual)``.

    Where the compiled kernel fits (float32 CPU, "same" 3x3 or 5x5), GELU and the convolution are one pass
    over memory and GELU's output is never stored: 1.4-2.1x faster than the two operations on this model's
    FFN maps at detection resolution, and in training only ``x`` is kept. Elsewhere GELU runs first, in
    place when ``inplace`` (``x`` is then overwritten).
    """
    weight = _conv_weight(conv, residual)
    nchw = x.permute(0, 3, 1, 2)
    if not _gelu_kernel_fits(conv, nchw, weight):
        return depthwise_nhwc(conv, torch.ops.aten.gelu_(x) if inplace else F.gelu(x), residual)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        out = _DepthwiseConv.apply(nchw, weight, conv.bias, True)
    else:
        out = _kernels.depthwise_forward(x, weight, conv.bias, True).permute(0, 3, 1, 2)
    return out.permute(0, 2, 3, 1)


def gelu_depthwise_grads(conv, x, grad, residual=False):
    """Gradients of ``out = gelu_depthwise_nhwc(conv, x, residual)`` for the output gradient ``grad``, without
    autograd state, and ``out`` itself (for callers that recompute it in backward):
    (input gradient, weight gradient, bias gradient or None, channel sums of the input gradient, out). The
    channel sums are the bias gradient of a linear layer that produced ``x``.

    The compiled backward gives all five in one pass; elsewhere they come from autograd, and the weight and
    bias gradients are None where those parameters need none.
    """
    weight = _conv_weight(conv, residual)
    nchw = x.permute(0, 3, 1, 2)
    if _gelu_kernel_fits(conv, nchw, weight) and grad.dtype == torch.float32:
        grad_x, grad_weight, grad_bias, grad_sum, out = _kernels.depthwise_backward(
            x.contiguous(), grad.contiguous(), weight.detach(), True, True, conv.bias, True)
        return grad_x, grad_weight, grad_bias if conv.bias is not None else None, grad_sum, out
    params = [p for p in (conv.weight, conv.bias) if p is not None and p.requires_grad]
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        out = gelu_depthwise_nhwc(conv, x, residual)
    grad_x, *param_grads = torch.autograd.grad(out, [x] + params, grad.to(out.dtype))
    by_param = dict(zip(map(id, params), param_grads))
    bias_grad = None if conv.bias is None else by_param.get(id(conv.bias))
    return grad_x, by_param.get(id(conv.weight)), bias_grad, grad_x.sum((0, 1, 2)), out.detach()
