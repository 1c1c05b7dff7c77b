"""SecViT backbone (Semantic Equitable Clustering vision transformer) for mmdetection and mmsegmentation.

Inside a stage the feature map travels as a contiguous (B, H, W, C) tensor: LayerNorm and the 1x1
projections work on its last dim, and the depthwise convolutions see it as a channels-last NCHW view,
so no layout copies are made between them.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from .checkpoint_utils import load_backbone_checkpoint
from .depthwise_conv import depthwise_nhwc, gelu_depthwise_grads, gelu_depthwise_nhwc
from .reuse import reuse_without_grad
from .sec_attention import (cluster_assignment, cluster_length, rope_angles, rope_tables, sec_attention,
                            split_values)

# Variants of the official classification models. Every released variant uses 32, 8, 2 clusters in
# stages 1-3 and global attention in stage 4 (98 tokens per cluster at 224 px).
ARCH_SETTINGS = {
    'tiny': dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 9, 2), num_heads=(2, 4, 8, 16),
                 layer_scale=(False, False, False, False), drop_path_rate=0.1),
    'small': dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(2, 4, 8, 16),
                  layer_scale=(False, False, False, False), drop_path_rate=0.15),
    'base': dict(embed_dims=(80, 160, 320, 512), depths=(4, 8, 26, 8), num_heads=(5, 5, 10, 16),
                 layer_scale=(False, False, True, True), drop_path_rate=0.4),
    'large': dict(embed_dims=(112, 224, 448, 640), depths=(4, 8, 26, 8), num_heads=(7, 7, 14, 20),
                  layer_scale=(False, False, True, True), drop_path_rate=0.5),
}
ARCH_ALIASES = {'t': 'tiny', 's': 'small', 'b': 'base', 'l': 'large'}
OFFICIAL_NUM_CLUSTERS = (32, 8, 2, -1)
MIN_INPUT_SIZE = 32
POINTWISE_CONV_MIN_TOKENS = 1024  # see linear_nhwc
# What a block's FFN keeps for backward in training: 'none' keeps every activation (plain autograd);
# 'activation' keeps its input and fc1's output and recomputes the norm, GELU and depthwise conv;
# 'all' keeps only its input and recomputes fc1 as well. See _RecomputedNormFFN.
FFN_RECOMPUTE_MODES = ('none', 'activation', 'all')


def resolve_arch(arch):
    """Turn an arch name, alias or dict into a complete settings dict.

    A dict needs ``embed_dims``, ``depths`` and ``num_heads`` (one entry per stage) and may set
    ``layer_scale`` (per stage), ``mlp_ratio`` and ``drop_path_rate``.
    """
    if isinstance(arch, str):
        name = ARCH_ALIASES.get(arch.lower(), arch.lower())
        if name not in ARCH_SETTINGS:
            valid = sorted(ARCH_SETTINGS) + sorted(ARCH_ALIASES)
            raise KeyError(f'Unknown SecViT arch {arch!r}; choose one of {valid} or pass a dict')
        return dict(ARCH_SETTINGS[name], mlp_ratio=3.0)
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
    missing = {'embed_dims', 'depths', 'num_heads'} - set(arch)
    if missing:
        raise KeyError(f'Custom SecViT arch is missing {sorted(missing)}')
    unknown = set(arch) - {'embed_dims', 'depths', 'num_heads', 'layer_scale', 'mlp_ratio', 'drop_path_rate'}
    if unknown:
        raise KeyError(f'Custom SecViT arch has unknown keys {sorted(unknown)}')
    num_stages = len(arch['depths'])
    settings = dict(layer_scale=(False,) * num_stages, mlp_ratio=3.0, drop_path_rate=0.1)
    settings.update(arch)
    for key in ('embed_dims', 'num_heads', 'layer_scale'):
        if len(settings[key]) != num_stages:
            raise ValueError(f'arch[{key!r}] has {len(settings[key])} entries, depths has {num_stages}')
    return settings


def per_stage(value, num_stages, name):
    """Broadcast an int to every stage, or check that a sequence has one entry per stage."""
    if isinstance(value, int):
        return (value,) * num_stages
    value = tuple(value)
    if len(value) != num_stages:
        raise ValueError(f'{name} needs one entry per stage ({num_stages}), got {value}')
    return value


def pointwise_conv(x, weight, bias=None):
    """``F.linear`` on a (B, H, W, C) tensor as oneDNN's 1x1 convolution of its channels-last NCHW view."""
    return F.conv2d(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias).permute(0, 2, 3, 1).contiguous()


def _row_grad(grad, inputs, param):
    """Gradient of a linear layer's weight from (..., out) gradients and (..., in) inputs.

    On the (B, H, W, C) maps that :func:`linear_nhwc` runs as 1x1 convolutions, where the layer narrows or
    keeps the width (out <= in: proj, fc2) it is oneDNN's 1x1-convolution weight gradient, which
    took 0.56-0.95x the matmul's time on this model's shapes at detection resolution (narrowest stage-1
    shapes fastest); where the layer widens the matmul was as fast or faster. Elsewhere it is the matmul.
    """
    if (grad.dim() == 4 and grad.shape[-1] <= inputs.shape[-1] and grad.dtype == inputs.dtype == param.dtype
            and _pointwise_conv_fits(grad)):
        return torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), inputs.permute(0, 3, 1, 2), param.detach()[:, :, None, None], None, [1, 1],
            [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1].view(param.shape)
    rows = grad.reshape(-1, grad.shape[-1])
    return (rows.t() @ inputs.reshape(-1, inputs.shape[-1]).to(rows.dtype)).to(param.dtype)


def _bias_grad(grad, param):
    """Gradient of a linear layer's bias from (..., out) gradients."""
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(param.dtype)


class _PointwiseConv(torch.autograd.Function):
    """:func:`pointwise_conv` with a backward that takes the input gradient from a 1x1 convolution with the
    transposed weight and the weight gradient from one matmul."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return pointwise_conv(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = pointwise_conv(grad, weight.t())
        if ctx.needs_input_grad[1]:
            grad_weight = _row_grad(grad, x, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = _bias_grad(grad, weight)
        return grad_x, grad_weight, grad_bias


def resolve_recompute_ffn(value, num_stages):
    """Per-stage :data:`FFN_RECOMPUTE_MODES` from ``SecViT(recompute_ffn=...)``: True is 'all' in the first
    stage and 'activation' after it, False is 'none', a str applies to every stage."""
    if isinstance(value, bool):
        return tuple('all' if value and i == 0 else 'activation' if value else 'none' for i in range(num_stages))
    modes = per_stage((value,) * num_stages if isinstance(value, str) else value, num_stages, 'recompute_ffn')
    unknown = [mode for mode in modes if mode not in FFN_RECOMPUTE_MODES]
    if unknown:
        raise ValueError(f'recompute_ffn entries must be True, False or one of {FFN_RECOMPUTE_MODES}, got {unknown}')
    return modes


def _plain_cpu_float32(x):
    """Whether ``x`` is a float32 CPU tensor outside autocast and traced graphs (FLOP counting), where the
    hand-written CPU paths of this module apply."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            and not torch.jit.is_tracing())


def _pointwise_conv_fits(x):
    """Whether :func:`linear_nhwc` runs the (B, H, W, C) ``x`` as a 1x1 convolution (see there)."""
    return _plain_cpu_float32(x) and x.shape[1] * x.shape[2] >= POINTWISE_CONV_MIN_TOKENS


def linear_nhwc(x, weight, bias):
    """``F.linear`` on a (B, H, W, C) tensor.

    On float32 CPU maps of at least ``POINTWISE_CONV_MIN_TOKENS`` positions, outside autocast and traced
    graphs (FLOP counting), it runs as oneDNN's 1x1 convolution of the channels-last NCHW view, and so does
    the input gradient (:class:`_PointwiseConv`): on this model's shapes at detection resolution oneDNN
    reached 70-100 GMAC/s on 2 cores where the matmuls of ``F.linear`` reached 37-92 (the narrow stage-1
    shapes were slowest). Elsewhere it is ``F.linear``.
    """
    if _pointwise_conv_fits(x):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _PointwiseConv.apply(x, weight, bias)
        return pointwise_conv(x, weight, bias)
    return F.linear(x, weight, bias)


def _project(x, weight, bias=None):
    """``F.linear`` on a (B, H, W, C) tensor, as :func:`pointwise_conv` where :func:`linear_nhwc` would use it
    (no autograd function)."""
    return pointwise_conv(x, weight, bias) if _pointwise_conv_fits(x) else F.linear(x, weight, bias)


class _NormLinear(torch.autograd.Function):
    """``F.linear(layer_norm(x), weight, bias)`` on a (B, H, W, C) tensor that keeps ``x`` but not the
    normalised map for backward, which recomputes it (one pass over ``x``): one (B, H, W, C) map less kept
    per block. The products are :func:`_project`'s."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, weight, bias):
        ctx.save_for_backward(x, norm_weight, norm_bias, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return _project(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        normed, mean, rstd = torch.ops.aten.native_layer_norm(x, x.shape[-1:], norm_weight, norm_bias, ctx.eps)
        grad = grad.contiguous()
        grad_weight = _row_grad(grad, normed, weight) if needs[4] else None
        grad_bias = _bias_grad(grad, weight) if ctx.has_bias and needs[5] else None
        del normed
        grad_x = grad_norm_weight = grad_norm_bias = None
        if any(needs[:3]):
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                _project(grad, weight.t()), x, x.shape[-1:], mean, rstd, norm_weight, norm_bias,
                [needs[0], needs[1], needs[2]])
        return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


def norm_linear_nhwc(x, norm, weight, bias):
    """``linear_nhwc(norm(x), weight, bias)`` for an ``nn.LayerNorm`` ``norm``. In training on float32 CPU
    tensors outside autocast and traced graphs, the normalised map is recomputed in backward instead of kept
    (:class:`_NormLinear`)."""
    params = (x, norm.weight, norm.bias, weight, bias)
    if (_plain_cpu_float32(x) and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in params)):
        return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, weight, bias)
    return linear_nhwc(norm(x), weight, bias)


class SECAttention(nn.Module):
    """SEC attention with 2-D rotary position embedding on q and k and a 5x5 LePE on v.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads; each head clusters its own tokens.
        num_clusters (int): Fixed cluster count (used when ``cluster_size <= 0``); <= 1 is global attention.
        cluster_size (int): Fixed maximum tokens per cluster; <= 0 to use ``num_clusters``.
    """

    def __init__(self, embed_dims, num_heads, num_clusters=-1, cluster_size=-1):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims {embed_dims} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = embed_dims // num_heads
        self.num_clusters = num_clusters
        self.cluster_size = cluster_size
        self.qkv = nn.Linear(embed_dims, embed_dims * 3)
        self.lepe = nn.Conv2d(embed_dims, embed_dims, 5, padding=2, groups=embed_dims)
        self.proj = nn.Linear(embed_dims, embed_dims)

    def cluster_length(self, num_tokens):
        return cluster_length(num_tokens, self.num_clusters, self.cluster_size)

    def project(self, x, norm=None):
        """x: (B, H, W, C), normalised first by ``norm`` (an nn.LayerNorm) if given. Returns q, k, v packed as
        (B, N, heads, 3, head_dim), before the rotary embedding and the softmax scale (:func:`sec_attention`
        applies both).

        The qkv rows are regrouped per head (:meth:`per_head_qkv`; the parameter keeps the official layout),
        so the projection writes every (token, head) row of q, k and v contiguously.
        """
        batch, height, width, _ = x.shape
        weight, bias = reuse_without_grad(self.qkv, 'per_head', self.per_head_qkv, self.qkv.weight, self.qkv.bias)
        packed = linear_nhwc(x, weight, bias) if norm is None else norm_linear_nhwc(x, norm, weight, bias)
        return packed.view(batch, height * width, self.num_heads, 3, self.head_dim)

    def per_head_qkv(self, weight, bias):
        """qkv weight and bias with rows ordered (head, q/k/v, channel) instead of (q/k/v, head, channel)."""
        channels = weight.shape[1]
        weight = weight.view(3, self.num_heads, self.head_dim, channels).transpose(0, 1)
        bias = bias.view(3, self.num_heads, self.head_dim).transpose(0, 1)
        return weight.reshape(3 * channels, channels), bias.reshape(3 * channels)

    def cluster_ids(self, x, rope, norm=None):
        """Cluster index of every position per head, shape (B, heads, H, W), for inspection."""
        packed = self.project(x, norm)
        clusters = cluster_assignment(packed, self.cluster_length(packed.shape[1]), rope)
        return clusters.unflatten(-1, x.shape[1:3])

    def forward(self, x, rope, norm=None):
        """x: (B, H, W, C); rope: tables from :func:`rope_tables`; norm: the block's pre-norm (nn.LayerNorm) or
        None, applied to ``x`` in the projection (:func:`norm_linear_nhwc`: its output is not kept for
        backward). Returns (B, H, W, C)."""
        packed, values = split_values(self.project(x, norm))
        lepe = depthwise_nhwc(self.lepe, values.view(x.shape))
        out = sec_attention(packed, self.cluster_length(packed.shape[1]), rope=rope).view_as(x)
        return linear_nhwc(out + lepe, self.proj.weight, self.proj.bias)


class ConvFFN(nn.Module):
    """FFN: 1x1 (C -> hidden), GELU, residual 3x3 depthwise conv, 1x1 (hidden -> C)."""

    def __init__(self, embed_dims, hidden_dims):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.dwconv = nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def activate(self, pre_act, inplace=False):
        """GELU and the residual depthwise conv: fc1's output to fc2's input (one compiled pass where it fits,
        see :func:`gelu_depthwise_nhwc`). Elsewhere ``inplace`` overwrites ``pre_act`` with its GELU instead of
        allocating another (N, hidden) tensor."""
        return gelu_depthwise_nhwc(self.dwconv, pre_act, residual=True, inplace=inplace)

    def forward(self, x):
        pre_act = linear_nhwc(x, self.fc1.weight, self.fc1.bias)
        hidden = self.activate(pre_act, inplace=not torch.is_grad_enabled())
        return linear_nhwc(hidden, self.fc2.weight, self.fc2.bias)


def autocast_state(device_type):
    """Keyword arguments of ``torch.autocast`` that re-enter the current autocast state of ``device_type``."""
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


class _RecomputedNormFFN(torch.autograd.Function):
    """``ffn(norm(x))`` that keeps for backward only ``x`` and, with ``keep_pre_act``, fc1's output.

    The backward recomputes the norm, GELU and depthwise conv (and fc1's output when it was not kept) and
    differentiates fc1 and fc2 by hand, so fc2's matmul, and with ``keep_pre_act`` fc1's, is never rerun
    and none of the FFN's other (N, hidden) activations is kept. GELU and the depthwise conv are
    differentiated together (:func:`gelu_depthwise_grads`), which also gives fc1's bias gradient and fc2's
    input. Inputs after ``keep_pre_act`` are the parameters, in :meth:`params` order, so that they receive
    gradients.
    """

    @staticmethod
    def params(norm, ffn):
        return (norm.weight, norm.bias, ffn.fc1.weight, ffn.fc1.bias, ffn.dwconv.weight, ffn.dwconv.bias,
                ffn.fc2.weight, ffn.fc2.bias)

    @staticmethod
    def forward(ctx, x, norm, ffn, keep_pre_act, *params):
        pre_act = linear_nhwc(norm(x), ffn.fc1.weight, ffn.fc1.bias)
        ctx.save_for_backward(x, pre_act if keep_pre_act else None)
        ctx.norm, ctx.ffn = norm, ffn
        ctx.autocast = autocast_state(x.device.type)
        return linear_nhwc(ffn.activate(pre_act, inplace=not keep_pre_act), ffn.fc2.weight, ffn.fc2.bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, pre_act = ctx.saved_tensors
        # needs_input_grad: x (0), norm weight/bias (4, 5), fc1 (6, 7), dwconv (8, 9), fc2 (10, 11).
        needs = ctx.needs_input_grad
        norm, ffn = ctx.norm, ctx.ffn
        grads = [None] * len(needs)
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            x = x.detach().requires_grad_(needs[0])
            normed = norm(x)
        below_fc2 = any(needs[:10])  # anything but fc2's parameters needs a gradient
        with torch.no_grad(), torch.autocast(**ctx.autocast):
            if pre_act is None:
                pre_act = linear_nhwc(normed, ffn.fc1.weight, ffn.fc1.bias)
            if not below_fc2:
                hidden = ffn.activate(pre_act)
        grad_out = grad_out.to(pre_act.dtype)
        if below_fc2:
            # fc2's input gradient does not need fc2's input, which the one-pass GELU + depthwise backward
            # recomputes along with its gradients.
            grad_hidden = linear_nhwc(grad_out, ffn.fc2.weight.t().to(grad_out.dtype), None)
            with torch.autocast(**ctx.autocast):
                grad_pre_act, grad_dw_weight, grad_dw_bias, grad_fc1_bias, hidden = gelu_depthwise_grads(
                    ffn.dwconv, pre_act, grad_hidden, residual=True)
            del grad_hidden
            grads[8] = grad_dw_weight if needs[8] else None
            grads[9] = grad_dw_bias if needs[9] else None
        if needs[10]:
            grads[10] = _row_grad(grad_out, hidden, ffn.fc2.weight)
        if needs[11]:
            grads[11] = _bias_grad(grad_out, ffn.fc2.bias)
        if not below_fc2:
            return tuple(grads)
        del hidden
        if needs[6]:
            grads[6] = _row_grad(grad_pre_act, normed, ffn.fc1.weight)
        if needs[7]:
            grads[7] = grad_fc1_bias.to(ffn.fc1.bias.dtype)
        norm_inputs = [(i, t) for i, t in ((0, x), (4, norm.weight), (5, norm.bias)) if needs[i]]
        if norm_inputs:
            grad_normed = linear_nhwc(grad_pre_act, ffn.fc1.weight.t().to(grad_pre_act.dtype), None)
            for (i, _), grad in zip(norm_inputs, torch.autograd.grad(
                    normed, [t for _, t in norm_inputs], grad_normed.to(normed.dtype))):
                grads[i] = grad
        return tuple(grads)


def residual_add(x, branch, gamma=None, drop_prob=0.0, training=False):
    """``x + drop_path(gamma * branch)``: a residual branch with layer scale and stochastic depth.

    The per-sample keep mask (drawn as mmcv's ``DropPath`` draws it, divided by the keep probability) and
    the layer scale form one broadcast factor, so the branch costs one ``addcmul`` (and one product in
    backward) instead of a division, two products and the add.

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


class SecViTBlock(nn.Module):
    """Conditional position conv, then pre-norm SEC attention and FFN, each residual.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        mlp_ratio (float): FFN hidden size over ``embed_dims``.
        num_clusters (int): See :class:`SECAttention`.
        cluster_size (int): See :class:`SECAttention`.
        drop_path (float): Stochastic depth rate.
        layer_scale_init (float | None): Initial layer scale; None disables layer scale.
        recompute_ffn (str): What the FFN keeps for backward in training (see :data:`FFN_RECOMPUTE_MODES`).
    """

    def __init__(self, embed_dims, num_heads, mlp_ratio=3.0, num_clusters=-1, cluster_size=-1, drop_path=0.0,
                 layer_scale_init=None, recompute_ffn='none'):
        super().__init__()
        if recompute_ffn not in FFN_RECOMPUTE_MODES:
            raise ValueError(f'recompute_ffn must be one of {FFN_RECOMPUTE_MODES}, got {recompute_ffn!r}')
        self.recompute_ffn = recompute_ffn
        self.cpe = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims)
        self.norm1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = SECAttention(embed_dims, num_heads, num_clusters, cluster_size)
        self.norm2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.ffn = ConvFFN(embed_dims, int(embed_dims * mlp_ratio))
        self.drop_path = drop_path
        if layer_scale_init is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1 = nn.Parameter(torch.full((embed_dims,), float(layer_scale_init)))
            self.gamma2 = nn.Parameter(torch.full((embed_dims,), float(layer_scale_init)))

    def forward(self, x, rope):
        x = depthwise_nhwc(self.cpe, x, residual=True)
        attn = self.attn(x, rope, self.norm1)
        x = residual_add(x, attn, self.gamma1, self.drop_path, self.training)
        params = _RecomputedNormFFN.params(self.norm2, self.ffn)
        if (self.recompute_ffn != 'none' and torch.is_grad_enabled()
                and any(t.requires_grad for t in (x, *params))):
            ffn = _RecomputedNormFFN.apply(x, self.norm2, self.ffn, self.recompute_ffn == 'activation', *params)
        else:
            ffn = self.ffn(self.norm2(x))
        return residual_add(x, ffn, self.gamma2, self.drop_path, self.training)


class SecViTStage(BaseModule):
    """Blocks of one resolution, then (except in the last stage) a 3x3 stride-2 conv + norm downsampling.

    Args:
        embed_dims (int): Channels of the stage.
        depth (int): Number of blocks.
        num_heads (int): Attention heads.
        out_dims (int | None): Channels after downsampling; None for no downsampling.
        drop_paths (Sequence[float]): Stochastic depth rate of each block.
        with_cp (bool): Gradient checkpointing of each block (non-reentrant).
        norm_cfg (dict): Norm of the downsampling layer.
        block_kwargs: Passed to every :class:`SecViTBlock`.
    """

    def __init__(self, embed_dims, depth, num_heads, out_dims, drop_paths, with_cp=False,
                 norm_cfg=dict(type='BN'), init_cfg=None, **block_kwargs):
        super().__init__(init_cfg=init_cfg)
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(
            SecViTBlock(embed_dims, num_heads, drop_path=drop_paths[i], **block_kwargs) for i in range(depth))
        self.downsample = None if out_dims is None else conv3x3_norm(embed_dims, out_dims, 2, norm_cfg)
        self.register_buffer('rope_angle', rope_angles(embed_dims // num_heads), persistent=False)
        self.key_scale = (embed_dims // num_heads) ** -0.5

    def forward(self, x):
        """x: (B, H, W, C). Returns the stage output (B, H, W, C) and the downsampled map for the next stage."""
        rope = rope_tables(x.shape[1], x.shape[2], self.rope_angle, self.key_scale)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        if self.downsample is None:
            return x, None
        down = conv_norm_act(self.downsample, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x, down.contiguous()


def conv3x3_norm(in_dims, out_dims, stride, norm_cfg, gelu=False):
    """3x3 conv (with bias, as in the official model), norm and optional GELU; keys ``conv.*`` and e.g. ``bn.*``."""
    norm_name, norm = build_norm_layer(norm_cfg, out_dims)
    layers = [('conv', nn.Conv2d(in_dims, out_dims, 3, stride, 1)), (norm_name, norm)]
    if gelu:
        layers.append(('act', nn.GELU()))
    return nn.Sequential(OrderedDict(layers))


def fold_batch_norm(conv_weight, conv_bias, norm_weight, norm_bias, running_mean, running_var, eps):
    """Weight and bias of one convolution equal to ``conv`` followed by an eval-mode batch norm."""
    scale = norm_weight * (running_var + eps).rsqrt()
    return conv_weight * scale[:, None, None, None], (conv_bias - running_mean) * scale + norm_bias


def conv_norm_act(layer, x):
    """Run a :func:`conv3x3_norm` layer on NCHW ``x``.

    Without autograd, an affine batch norm in eval mode is folded into the convolution (the folded weight
    is computed once and reused while the parameters and statistics are unchanged) and GELU works in
    place: one pass over the output instead of three. Otherwise, and in traced graphs, the layer runs as is.
    """
    conv, norm = layer[0], layer[1]
    if (torch.is_grad_enabled() or torch.jit.is_tracing() or not isinstance(norm, _BatchNorm) or norm.training
            or not norm.affine or norm.running_mean is None):
        return layer(x)
    weight, bias = reuse_without_grad(
        layer, 'folded', lambda *tensors: fold_batch_norm(*tensors, norm.eps), conv.weight, conv.bias, norm.weight,
        norm.bias, norm.running_mean, norm.running_var)
    x = F.conv2d(x, weight, bias, conv.stride, conv.padding)
    return torch.ops.aten.gelu_(x) if len(layer) > 2 else x


def build_stem(embed_dims, norm_cfg):
    """Four 3x3 conv + norm layers with strides 2, 1, 1, 2 (GELU after the first three): stride 4 overall."""
    mid = embed_dims // 2
    return nn.Sequential(
        conv3x3_norm(3, mid, 2, norm_cfg, gelu=True),
        conv3x3_norm(mid, mid, 1, norm_cfg, gelu=True),
        conv3x3_norm(mid, mid, 1, norm_cfg, gelu=True),
        conv3x3_norm(mid, embed_dims, 2, norm_cfg))


@MODELS.register_module()
class SecViT(BaseModule):
    """SecViT: vision transformer with Semantic Equitable Clustering attention (arXiv 2405.13337).

    Outputs one NCHW feature map per entry of ``out_indices``, at strides 4, 8, 16 and 32.

    Args:
        arch (str | dict): 'tiny', 'small', 'base', 'large' (or 't', 's', 'b', 'l'), or a dict with
            ``embed_dims``, ``depths``, ``num_heads`` and optionally ``layer_scale``, ``mlp_ratio``,
            ``drop_path_rate``.
        num_clusters (int | Sequence[int] | None): Fixed number of clusters per stage (-1 or 1 is global
            attention). Default: the official (32, 8, 2, -1), unless ``cluster_size`` is given.
        cluster_size (int | Sequence[int] | None): Fixed maximum tokens per cluster per stage (-1 is
            global attention); the cluster count then grows with the image and cost stays linear in the
            number of pixels. Mutually exclusive with ``num_clusters``.
        out_indices (Sequence[int]): Stages whose outputs are returned.
        drop_path_rate (float | None): Stochastic depth rate, linear over all blocks. Default: the
            variant's rate (0.1 / 0.15 / 0.4 / 0.5).
        layer_scale_init (float): Initial layer scale in the stages where the variant uses it.
        norm_cfg (dict): Norm of the convolutional stem and downsampling layers.
        out_norm_cfg (dict | None): Norm applied to each output; None for no output norm.
        frozen_stages (int): Freeze the stem (0) and the first ``frozen_stages`` stages; -1 freezes nothing.
        norm_eval (bool): Keep batch norms in eval mode while training.
        with_cp (bool): Use (non-reentrant) gradient checkpointing in every block.
        recompute_ffn (bool | str | Sequence[str]): What each FFN keeps for backward in training, for all
            stages or per stage (results are unchanged: nothing inside the FFN is random). 'none': every
            activation; 'activation': its input and fc1's output, recomputing GELU and the depthwise conv;
            'all': only its input, recomputing fc1 too. True (default) is 'all' in stage 1, whose
            activations are largest for their compute, and 'activation' after it; False is 'none'.
            Not used with ``with_cp``, which recomputes whole blocks.
        pretrained (str | None): Deprecated alias of ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
        init_cfg (dict | None): ``dict(type='Pretrained', checkpoint=PATH)`` loads an mmsecvit or an official
            SecViT classification checkpoint (converted on the fly; head weights are dropped).
    """

    def __init__(self,
                 arch='small',
                 num_clusters=None,
                 cluster_size=None,
                 out_indices=(0, 1, 2, 3),
                 drop_path_rate=None,
                 layer_scale_init=1e-6,
                 norm_cfg=dict(type='BN'),
                 out_norm_cfg=dict(type='LN', eps=1e-6),
                 frozen_stages=-1,
                 norm_eval=False,
                 with_cp=False,
                 recompute_ffn=True,
                 pretrained=None,
                 init_cfg=None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('Set either pretrained or init_cfg, not both')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        settings = resolve_arch(arch)
        self.embed_dims = tuple(settings['embed_dims'])
        self.depths = tuple(settings['depths'])
        self.num_stages = len(self.depths)
        num_heads = tuple(settings['num_heads'])

        if num_clusters is not None and cluster_size is not None:
            raise ValueError('Set num_clusters (fixed cluster count) or cluster_size (fixed tokens per '
                             'cluster), not both')
        if cluster_size is None:
            if num_clusters is None:
                num_clusters = OFFICIAL_NUM_CLUSTERS[:self.num_stages]
            self.num_clusters = per_stage(num_clusters, self.num_stages, 'num_clusters')
            self.cluster_size = (-1,) * self.num_stages
        else:
            self.cluster_size = per_stage(cluster_size, self.num_stages, 'cluster_size')
            self.num_clusters = (-1,) * self.num_stages

        self.out_indices = tuple(out_indices)
        for index in self.out_indices:
            if not 0 <= index < self.num_stages:
                raise ValueError(f'out_indices entries must be in [0, {self.num_stages}), got {self.out_indices}')
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        if drop_path_rate is None:
            drop_path_rate = settings['drop_path_rate']
        drop_paths = torch.linspace(0, drop_path_rate, sum(self.depths)).tolist()
        recompute_modes = resolve_recompute_ffn(recompute_ffn, self.num_stages)

        self.patch_embed = build_stem(self.embed_dims[0], norm_cfg)
        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            first = sum(self.depths[:i])
            self.stages.append(SecViTStage(
                self.embed_dims[i], self.depths[i], num_heads[i],
                out_dims=self.embed_dims[i + 1] if i + 1 < self.num_stages else None,
                drop_paths=drop_paths[first:first + self.depths[i]],
                with_cp=with_cp,
                norm_cfg=norm_cfg,
                mlp_ratio=settings['mlp_ratio'],
                num_clusters=self.num_clusters[i],
                cluster_size=self.cluster_size[i],
                layer_scale_init=layer_scale_init if settings['layer_scale'][i] else None,
                recompute_ffn='none' if with_cp else recompute_modes[i]))
        for i in self.out_indices:
            norm = nn.Identity() if out_norm_cfg is None else build_norm_layer(out_norm_cfg, self.embed_dims[i])[1]
            self.add_module(f'norm{i}', norm)
        self._freeze_stages()

    @property
    def out_channels(self):
        """Channels of each returned feature map, in ``out_indices`` order."""
        return tuple(self.embed_dims[i] for i in self.out_indices)

    def _freeze_stages(self):
        frozen = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        for i in range(self.frozen_stages):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        """Switch mode, keeping frozen stages (and, with ``norm_eval``, batch norms) in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self):
        """Official initialisation (truncated normal, std 0.02), ``init_cfg``'s checkpoint, or other init_cfg.

        ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix=None, use_ema=False)``: ``use_ema`` picks
        the EMA weights of an official training checkpoint.
        """
        if self.init_cfg is not None:
            if self.init_cfg.get('type') == 'Pretrained':
                load_backbone_checkpoint(self, self.init_cfg['checkpoint'], prefix=self.init_cfg.get('prefix'),
                                         use_ema=self.init_cfg.get('use_ema', False))
                self._is_init = True
            else:
                super().init_weights()
            return
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self._is_init = True

    def check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'SecViT expects a 4-D tensor of shape (B, 3, H, W), got {shape}')
        if x.shape[1] != 3:
            raise ValueError(f'SecViT expects 3 input channels, shape (B, 3, H, W); got {tuple(x.shape)}')
        if min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(f'SecViT needs H and W >= {MIN_INPUT_SIZE} (one token at stride 32), '
                             f'got input of shape {tuple(x.shape)}')

    def forward(self, x):
        """x: (B, 3, H, W). Returns a tuple of (B, C_i, ceil(H / s_i), ceil(W / s_i)) maps, s_i = 4 * 2**i."""
        self.check_input(x)
        # The stem runs channels-last (about 2.7x faster on CPU); its output is then (B, H, W, C) contiguous.
        x = x.contiguous(memory_format=torch.channels_last)
        for layer in self.patch_embed:
            x = conv_norm_act(layer, x)
        x = x.permute(0, 2, 3, 1).contiguous()
        outs = []
        for i, stage in enumerate(self.stages):
            out, x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(out).permute(0, 3, 1, 2).contiguous())
            if x is None:
                break
        return tuple(outs)
