"""Depthwise convolution on (B, H, W, C) tensors, with a faster CPU backward and, on small maps, forward.

On the CPU, PyTorch's depthwise convolution backward (oneDNN) takes about eight times as long as the
forward for the input gradient, and a 5x5 kernel's weight gradient is slower still. Both have cheap
equivalents: the input gradient of a stride-1 "same" depthwise convolution is the same convolution
with the kernel flipped, and the weight gradient comes from the compiled kernel (mmsecvit/csrc) or,
without it, from 3x3 weight gradients (the fast oneDNN case) of shifted windows of the padded input.
On small maps the convolution itself comes from a compiled kernel too (see ``_same_conv``).
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
    """Gradient of a stride-1, zero-padded ("same") depthwise convolution's weight.

    Float32 3x3 and 5x5 kernels go to the compiled kernel when it is available (mmsecvit/csrc, 1.2-2x
    faster than oneDNN for 3x3 and about 4x for 5x5 on this model's shapes); otherwise 3x3 uses oneDNN
    and larger kernels are assembled from 3x3 weight gradients of shifted windows.

    Args:
        x (Tensor): Convolution input, (B, C, H, W).
        grad (Tensor): Gradient of the output, (B, C, H, W).
        kernel_size (int): Odd kernel size k.

    Returns:
        Tensor: (C, 1, k, k).
    """
    channels = x.shape[1]
    if (kernel_size in (3, 5) and x.device.type == 'cpu' and x.dtype == grad.dtype == torch.float32
            and kernel_available()):
        nhwc = [t.permute(0, 2, 3, 1).contiguous() for t in (x, grad)]
        return _kernels.depthwise_weight_grad(*nhwc, kernel_size)
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


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 "same" depthwise convolution whose backward uses :func:`depthwise_weight_grad` and a
    flipped-kernel convolution for the input gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _same_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernel_size = weight.shape[-1]
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _same_conv(grad, weight.flip(2, 3), None)
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(x, grad, kernel_size)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias


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


# Largest input (values) for which the compiled depthwise convolution is used; above it oneDNN is as fast
# or faster (both are bound by memory bandwidth there).
KERNEL_MAX_VALUES = 2 ** 19


def _same_conv(x, weight, bias):
    """Stride-1 "same" depthwise convolution of a channels-last NCHW ``x``.

    Small float32 CPU maps with 3x3 or 5x5 kernels go to the compiled kernel (mmsecvit/csrc), which skips
    oneDNN's fixed cost per call: 1.04-3x faster on this model's maps at 224 px. Elsewhere (autocast and
    traced graphs for FLOP counting included) it is ``F.conv2d``.
    """
    if (weight.shape[-1] in (3, 5) and x.numel() <= KERNEL_MAX_VALUES and x.device.type == 'cpu'
            and x.dtype == weight.dtype == torch.float32 and x.stride(1) == 1
            and not torch.is_autocast_enabled('cpu') and not torch.jit.is_tracing() and kernel_available()):
        return _kernels.depthwise_conv(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, weight.shape[0])


def depthwise_nhwc(conv, x, residual=False):
    """Apply a stride-1 "same" depthwise nn.Conv2d to a (B, H, W, C) tensor through its channels-last
    NCHW view; returns (B, H, W, C).

    With ``residual``, returns ``x + conv(x)`` in one convolution by adding 1 to the kernel's centre tap.
    """
    weight = reuse_without_grad(conv, 'residual', _add_identity, conv.weight) if residual else conv.weight
    x = x.permute(0, 3, 1, 2)
    if _use_fast_backward(conv, x, weight):
        out = _DepthwiseConv.apply(x, weight, conv.bias)
    elif not torch.is_grad_enabled() and _is_same_depthwise(conv):
        out = _same_conv(x, weight, conv.bias)
    else:
        out = F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.permute(0, 2, 3, 1)
