"""Stride-1 "same" depthwise convolution on (B, H, W, C) tensors, alone or of the GELU of its input.

The compiled kernels do the forward, with or without GELU, in one pass, and the whole backward (input,
weight and bias gradients, and GELU's) in another. Without them, on the CPU, the input gradient is the
same convolution with the kernel flipped and the weight gradient comes from 3x3 weight gradients of
shifted windows of the padded input, both faster there than PyTorch's own depthwise backward (see
docs/performance.md). In half precision on the CPU, or under CPU autocast, they run in float32 on float32
copies where PyTorch's half-precision convolution is slower (dispatch's 'depthwise_precision').
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from . import kernels as compiled


def _weight_grad_3x3(x: Tensor, grad: Tensor, channels: int, padding: int) -> Tensor:
    """Weight gradient of a 3x3 depthwise convolution (``x`` and ``grad`` NCHW, any layout)."""
    return torch.ops.aten.convolution_backward(
        grad, x, x.new_empty(channels, 1, 3, 3), None, [1, 1], [padding, padding], [1, 1], False, [0, 0],
        channels, [False, True, False])[1]


def depthwise_weight_grad(x: Tensor, grad: Tensor, kernel_size: int) -> Tensor:
    """Gradient of a stride-1 "same" depthwise convolution's (C, 1, k, k) weight from NCHW input ``x`` and
    output gradient ``grad``: 3x3 from oneDNN, larger kernels assembled from 3x3 weight gradients of
    shifted windows."""
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


def _nhwc(x: Tensor) -> Tensor:
    """(B, H, W, C) view of an NCHW tensor, copied where its channels are not contiguous."""
    x = x.permute(0, 2, 3, 1)
    return x if x.stride(3) == 1 else x.contiguous()


def _same_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Stride-1 "same" depthwise convolution of a channels-last NCHW ``x``: the kernel where it applies,
    else ``F.conv2d``."""
    if dispatch.choose_backend('depthwise', x, weight) == 'kernel':
        return compiled.depthwise_forward(x.permute(0, 2, 3, 1), weight, bias, False).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, weight.shape[0])


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 "same" depthwise convolution of a channels-last NCHW ``x`` or, with ``gelu`` (kernel only), of
    ``gelu(x)``, whose output is then never stored. The backward is the kernel's where it applies, else a
    flipped-kernel convolution for the input gradient and :func:`depthwise_weight_grad`. The dispatch takes it
    with CPU autocast off only; the backward keeps autocast off wherever it is called."""

    @staticmethod
    @torch.amp.custom_fwd(device_type='cpu')
    def forward(ctx, x, weight, bias, gelu=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.gelu = bias is not None, gelu
        if gelu:
            return compiled.depthwise_forward(x.permute(0, 2, 3, 1), weight, bias, True).permute(0, 3, 1, 2)
        return _same_conv(x, weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type='cpu')
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needed = ctx.needs_input_grad
        x_nhwc = _nhwc(x)
        kernel = dispatch.choose_backend('gelu_depthwise', x_nhwc.permute(0, 3, 1, 2), weight) == 'kernel'
        if ctx.gelu or (grad.dtype == torch.float32 and kernel):
            grad_x, grad_weight, grad_bias, _, _ = compiled.depthwise_backward(
                x_nhwc, _nhwc(grad), weight, ctx.gelu, needed[0], None, False)
            return (grad_x.permute(0, 3, 1, 2) if needed[0] else None, grad_weight if needed[1] else None,
                    grad_bias if ctx.has_bias and needed[2] else None, None)
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if needed[0]:
            grad_x = _same_conv(grad, weight.flip(2, 3), None)
        if needed[1]:
            grad_weight = depthwise_weight_grad(x, grad, weight.shape[-1])
        if ctx.has_bias and needed[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


def _is_same_depthwise(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is a stride-1 "same" depthwise convolution with an odd square kernel."""
    kernel_size = conv.kernel_size[0]
    return (kernel_size % 2 == 1 and conv.kernel_size == (kernel_size, kernel_size)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding == (kernel_size // 2,) * 2
            and conv.groups == conv.in_channels == conv.out_channels)


def _add_identity(weight: Tensor) -> Tensor:
    """Depthwise kernel plus the identity (1 at the centre tap): ``conv(x) + x`` as one convolution."""
    identity = torch.zeros_like(weight)
    identity[:, :, weight.shape[2] // 2, weight.shape[3] // 2] = 1
    return weight + identity


def _conv_weight(conv: nn.Conv2d, residual: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The convolution's weight (cast to ``dtype`` if given), plus the identity with ``residual`` (see
    :func:`_add_identity`)."""
    weight = conv.weight if dtype is None else conv.weight.to(dtype)
    return _add_identity(weight) if residual else weight


def _records_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _float32(tensor: Optional[Tensor]) -> Optional[Tensor]:
    return None if tensor is None else tensor.float()


def _result_dtype(x: Tensor) -> torch.dtype:
    """The dtype of ``F.conv2d``'s output for the input ``x``: CPU autocast's where it is on, else ``x``'s."""
    return torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else x.dtype


def _runs_in_float32(conv: nn.Conv2d, x: Tensor, backward: bool) -> bool:
    """Whether ``conv`` of the NCHW ``x``, a stride-1 "same" depthwise convolution, runs in float32 (see
    dispatch's 'depthwise_precision'); ``backward``: whether its gradients are computed too."""
    return (_is_same_depthwise(conv)
            and dispatch.choose_backend('depthwise_precision', x, conv.weight, backward) == 'float32')


def _in_float32(function, conv: nn.Conv2d, x: Tensor, residual: bool, *args) -> Tensor:
    """``function(x, weight, bias, *args)`` with CPU autocast off on float32 copies of ``x`` and of ``conv``'s
    parameters (the identity added in float32 with ``residual``), its output cast to the dtype of a plain
    convolution of ``x`` (see :func:`_result_dtype`)."""
    dtype = _result_dtype(x)
    with torch.autocast('cpu', enabled=False):
        weight = _conv_weight(conv, residual, torch.float32)
        return function(x.float(), weight, _float32(conv.bias), *args).to(dtype)


def _same_depthwise(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Stride-1 "same" depthwise convolution of a channels-last NCHW ``x``, through :class:`_DepthwiseConv`
    where a gradient is recorded and its backward applies."""
    if not _records_grad(x, weight, bias):
        return _same_conv(x, weight, bias)
    if dispatch.choose_backend('depthwise_backward', x, weight) == 'flipped_conv':
        return _DepthwiseConv.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2, 1, weight.shape[0])


def depthwise_nhwc(conv: nn.Conv2d, x: Tensor, residual: bool = False) -> Tensor:
    """Apply a depthwise ``nn.Conv2d`` to a (B, H, W, C) tensor through its channels-last NCHW view; returns
    (B, H, W, C). With ``residual``, returns ``x + conv(x)`` as one convolution. A stride-1 "same" convolution
    in half precision on the CPU, or under CPU autocast, may run in float32 (see dispatch's
    'depthwise_precision'); it returns the dtype ``F.conv2d`` would."""
    x = x.permute(0, 3, 1, 2)
    if not _is_same_depthwise(conv):
        out = F.conv2d(x, _conv_weight(conv, residual), conv.bias, conv.stride, conv.padding, conv.dilation,
                       conv.groups)
    elif _runs_in_float32(conv, x, _records_grad(x, conv.weight, conv.bias)):
        out = _in_float32(_same_depthwise, conv, x, residual)
    else:
        out = _same_depthwise(x, _conv_weight(conv, residual), conv.bias)
    return out.permute(0, 2, 3, 1)


def _gelu_kernel_applies(conv: nn.Conv2d, x: Tensor, weight: Tensor) -> bool:
    return _is_same_depthwise(conv) and dispatch.choose_backend('gelu_depthwise', x, weight) == 'kernel'


def _gelu_same_depthwise(x: Tensor, weight: Tensor, bias: Optional[Tensor], inplace: bool) -> Tensor:
    """:func:`_same_depthwise` of ``gelu(x)`` for a (B, H, W, C) ``x``, returning (B, H, W, C): one pass where the
    kernel applies, else GELU first (in place with ``inplace``)."""
    nchw = x.permute(0, 3, 1, 2)
    if dispatch.choose_backend('gelu_depthwise', nchw, weight) == 'kernel':
        if _records_grad(x, weight, bias):
            return _DepthwiseConv.apply(nchw, weight, bias, True).permute(0, 2, 3, 1)
        return compiled.depthwise_forward(x, weight, bias, True)
    # GELU before the permutation: on the NCHW view it is slower.
    activated = torch.ops.aten.gelu_(x) if inplace else F.gelu(x)
    return _same_depthwise(activated.permute(0, 3, 1, 2), weight, bias).permute(0, 2, 3, 1)


def gelu_depthwise_nhwc(conv: nn.Conv2d, x: Tensor, residual: bool = False, inplace: bool = False) -> Tensor:
    """``depthwise_nhwc(conv, gelu(x), residual)``.

    With the kernel, GELU and the convolution are one pass over memory and GELU's output is never stored
    (in training only ``x`` is kept). Elsewhere GELU runs first, in place when ``inplace`` (``x`` is then
    overwritten). Where :func:`depthwise_nhwc` runs in float32, GELU does too.
    """
    if not _is_same_depthwise(conv):
        return depthwise_nhwc(conv, torch.ops.aten.gelu_(x) if inplace else F.gelu(x), residual)
    if _runs_in_float32(conv, x.permute(0, 3, 1, 2), _records_grad(x, conv.weight, conv.bias)):
        return _in_float32(_gelu_same_depthwise, conv, x, residual, inplace)
    return _gelu_same_depthwise(x, _conv_weight(conv, residual), conv.bias, inplace)


def _gelu_kernel_grads(conv: nn.Conv2d, x: Tensor, grad: Tensor, weight: Tensor,
                       bias: Optional[Tensor]) -> Optional[tuple]:
    """:func:`gelu_depthwise_grads`' results from the one-pass kernel, or None where it does not apply."""
    if not _gelu_kernel_applies(conv, x.permute(0, 3, 1, 2), weight) or grad.dtype != torch.float32:
        return None
    grad_x, grad_weight, grad_bias, grad_sum, out = compiled.depthwise_backward(
        x.contiguous(), grad.contiguous(), weight.detach(), True, True, bias, True)
    return grad_x, grad_weight, grad_bias if bias is not None else None, grad_sum, out


def _gelu_autograd_grads(conv: nn.Conv2d, x: Tensor, grad: Tensor, residual: bool) -> tuple:
    """:func:`gelu_depthwise_grads`' results from autograd through :func:`gelu_depthwise_nhwc`."""
    params = [p for p in (conv.weight, conv.bias) if p is not None and p.requires_grad]
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        out = gelu_depthwise_nhwc(conv, x, residual)
    grad_x, *param_grads = torch.autograd.grad(out, [x] + params, grad.to(out.dtype))
    by_param = dict(zip(map(id, params), param_grads))
    bias_grad = None if conv.bias is None else by_param.get(id(conv.bias))
    return grad_x, by_param.get(id(conv.weight)), bias_grad, grad_x.sum((0, 1, 2)), out.detach()


def gelu_depthwise_grads(conv: nn.Conv2d, x: Tensor, grad: Tensor,
                         residual: bool = False) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """Gradients of ``out = gelu_depthwise_nhwc(conv, x, residual)`` for the output gradient ``grad``, without
    autograd state, and ``out`` itself (for callers that recompute it in backward).

    Returns:
        tuple: (input gradient, weight gradient, bias gradient or None, channel sums of the input gradient,
        out). The channel sums are the bias gradient of a linear layer that produced ``x``. Without the
        kernel the weight and bias gradients are None where those parameters need none. Where the convolution
        runs in float32 (see :func:`depthwise_nhwc`), the results are cast to the dtypes of ``x``, of the
        parameters (weight, bias and channel sums) and of the plain convolution's output.
    """
    upcast = _runs_in_float32(conv, x.permute(0, 3, 1, 2), True)
    if upcast:
        with torch.autocast('cpu', enabled=False):
            weight = _conv_weight(conv, residual, torch.float32)
            results = _gelu_kernel_grads(conv, x.float(), grad.float(), weight, _float32(conv.bias))
    else:
        results = _gelu_kernel_grads(conv, x, grad, _conv_weight(conv, residual), conv.bias)
    if results is None:
        results = _gelu_autograd_grads(conv, x, grad, residual)
    if not upcast:
        return results
    bias_dtype = None if conv.bias is None else conv.bias.dtype
    dtypes = (x.dtype, conv.weight.dtype, bias_dtype, conv.weight.dtype, _result_dtype(x))
    return tuple(None if t is None else t.to(dtype) for t, dtype in zip(results, dtypes))


class DepthwiseConvNHWC(nn.Conv2d):
    """Stride-1 "same" depthwise ``nn.Conv2d`` (same parameters and state dict) applied to (B, H, W, C) maps.

    Args:
        channels (int): Input and output channels.
        kernel_size (int): Odd kernel size.
        residual (bool): Return ``x + conv(x)`` (computed as one convolution).
    """

    def __init__(self, channels: int, kernel_size: int, residual: bool = False):
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_nhwc(self, x, self.residual)
