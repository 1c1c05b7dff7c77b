"""SecViT backbone (Semantic Equitable Clustering vision transformer) for mmdetection and mmsegmentation.

Inside a stage the feature map travels as a contiguous (B, H, W, C) tensor: LayerNorm and the 1x1
projections work on its last dim, and the depthwise convolutions see it as a channels-last NCHW view.
The layers' fast implementations are in :mod:`mmsecvit.ops`.
"""
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import (
    ConvFFN,
    ConvNormAct,
    DepthwiseConvNHWC,
    LinearNHWC,
    PackedQKV,
    RotaryTables,
    cluster_assignment,
    cluster_length,
    residual_add,
    rope_angles,
    rope_tables,
    sec_attention,
    split_values,
)
from ..ops.ffn import RECOMPUTE_MODES as FFN_RECOMPUTE_MODES
from .checkpoint_utils import load_backbone_checkpoint

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


def resolve_arch(arch: Union[str, dict]) -> dict:
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


def per_stage(value: Union[int, Sequence[Any]], num_stages: int, name: str) -> Tuple[Any, ...]:
    """Broadcast an int to every stage, or check that a sequence has one entry per stage."""
    if isinstance(value, int):
        return (value,) * num_stages
    value = tuple(value)
    if len(value) != num_stages:
        raise ValueError(f'{name} needs one entry per stage ({num_stages}), got {value}')
    return value


def resolve_recompute_ffn(value: Union[bool, str, Sequence[str]], num_stages: int) -> Tuple[str, ...]:
    """Per-stage :data:`FFN_RECOMPUTE_MODES` from ``SecViT(recompute_ffn=...)``: True is 'all' in the first
    stage and 'activation' after it, False is 'none', a str applies to every stage."""
    if isinstance(value, bool):
        return tuple('all' if value and i == 0 else 'activation' if value else 'none' for i in range(num_stages))
    modes = per_stage((value,) * num_stages if isinstance(value, str) else value, num_stages, 'recompute_ffn')
    unknown = [mode for mode in modes if mode not in FFN_RECOMPUTE_MODES]
    if unknown:
        raise ValueError(f'recompute_ffn entries must be True, False or one of {FFN_RECOMPUTE_MODES}, got {unknown}')
    return modes


class SECAttention(nn.Module):
    """SEC attention with 2-D rotary position embedding on q and k and a 5x5 LePE on v.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads; each head clusters its own tokens.
        num_clusters (int): Fixed cluster count (used when ``cluster_size`` is -1); -1 or 1 is global attention.
        cluster_size (int): Fixed maximum tokens per cluster; -1 to use ``num_clusters``.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_clusters: int = -1, cluster_size: int = -1):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims {embed_dims} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = embed_dims // num_heads
        self.num_clusters = num_clusters
        self.cluster_size = cluster_size
        self.qkv = PackedQKV(embed_dims, num_heads)
        self.lepe = DepthwiseConvNHWC(embed_dims, 5)
        self.proj = LinearNHWC(embed_dims, embed_dims)

    def cluster_length(self, num_tokens: int) -> int:
        return cluster_length(num_tokens, self.num_clusters, self.cluster_size)

    def cluster_ids(self, x: Tensor, rope: RotaryTables, norm: Optional[nn.LayerNorm] = None) -> Tensor:
        """Cluster index of every position per head, shape (B, heads, H, W), for inspection."""
        qkv = self.qkv(x, norm)
        clusters = cluster_assignment(qkv, self.cluster_length(qkv.shape[1]), rope)
        return clusters.unflatten(-1, x.shape[1:3])

    def forward(self, x: Tensor, rope: RotaryTables, norm: Optional[nn.LayerNorm] = None) -> Tensor:
        """x: (B, H, W, C), normalised first by ``norm`` (the block's pre-norm) if given; rope: the map's
        rotary tables (:func:`rope_tables`), which the attention applies to q and k. Returns (B, H, W, C)."""
        qkv, v = split_values(self.qkv(x, norm))
        lepe = self.lepe(v.view(x.shape))
        out = sec_attention(qkv, self.cluster_length(qkv.shape[1]), rope=rope).view_as(x)
        return self.proj(out + lepe)


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

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float = 3.0, num_clusters: int = -1,
                 cluster_size: int = -1, drop_path: float = 0.0, layer_scale_init: Optional[float] = None,
                 recompute_ffn: str = 'none'):
        super().__init__()
        self.cpe = DepthwiseConvNHWC(embed_dims, 3, residual=True)
        self.norm1 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.attn = SECAttention(embed_dims, num_heads, num_clusters, cluster_size)
        self.norm2 = nn.LayerNorm(embed_dims, eps=1e-6)
        self.ffn = ConvFFN(embed_dims, int(embed_dims * mlp_ratio), recompute=recompute_ffn)
        self.drop_path = drop_path
        if layer_scale_init is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1 = nn.Parameter(torch.full((embed_dims,), float(layer_scale_init)))
            self.gamma2 = nn.Parameter(torch.full((embed_dims,), float(layer_scale_init)))

    def forward(self, x: Tensor, rope: RotaryTables) -> Tensor:
        x = self.cpe(x)
        x = residual_add(x, self.attn(x, rope, self.norm1), self.gamma1, self.drop_path, self.training)
        return residual_add(x, self.ffn(x, self.norm2), self.gamma2, self.drop_path, self.training)


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

    def __init__(self, embed_dims: int, depth: int, num_heads: int, out_dims: Optional[int],
                 drop_paths: Sequence[float], with_cp: bool = False, norm_cfg: dict = dict(type='BN'),
                 init_cfg: Optional[Union[dict, List[dict]]] = None, **block_kwargs: Any):
        super().__init__(init_cfg=init_cfg)
        self.with_cp = with_cp
        self.blocks = nn.ModuleList(
            SecViTBlock(embed_dims, num_heads, drop_path=drop_paths[i], **block_kwargs) for i in range(depth))
        self.downsample = None if out_dims is None else ConvNormAct(embed_dims, out_dims, 3, 2, norm_cfg)
        self.register_buffer('rope_angle', rope_angles(embed_dims // num_heads), persistent=False)
        self.key_scale = (embed_dims // num_heads) ** -0.5

    def forward(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """x: (B, H, W, C). Returns the stage output (B, H, W, C) and the downsampled map for the next stage."""
        rope = rope_tables(x.shape[1], x.shape[2], self.rope_angle, self.key_scale)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        if self.downsample is None:
            return x, None
        return x, self.downsample(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).contiguous()


def build_stem(embed_dims: int, norm_cfg: dict) -> nn.Sequential:
    """Four 3x3 conv + norm layers with strides 2, 1, 1, 2 (GELU after the first three): stride 4 overall."""
    mid = embed_dims // 2
    return nn.Sequential(
        ConvNormAct(3, mid, 3, 2, norm_cfg, gelu=True),
        ConvNormAct(mid, mid, 3, 1, norm_cfg, gelu=True),
        ConvNormAct(mid, mid, 3, 1, norm_cfg, gelu=True),
        ConvNormAct(mid, embed_dims, 3, 2, norm_cfg))


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
        out_indices (Sequence[int]): Stages whose outputs are returned; stages after the last are not built.
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
                 arch: Union[str, dict] = 'small',
                 num_clusters: Optional[Union[int, Sequence[int]]] = None,
                 cluster_size: Optional[Union[int, Sequence[int]]] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 drop_path_rate: Optional[float] = None,
                 layer_scale_init: float = 1e-6,
                 norm_cfg: dict = dict(type='BN'),
                 out_norm_cfg: Optional[dict] = dict(type='LN', eps=1e-6),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 recompute_ffn: Union[bool, str, Sequence[str]] = True,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
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
        for name, values in (('num_clusters', self.num_clusters), ('cluster_size', self.cluster_size)):
            if any(not isinstance(v, int) or (v < 1 and v != -1) for v in values):
                raise ValueError(f'{name} entries must be -1 (global attention) or a positive int, got {values}')

        self.out_indices = tuple(out_indices)
        if not self.out_indices:
            raise ValueError('out_indices must name at least one stage')
        for index in self.out_indices:
            if not 0 <= index < self.num_stages:
                raise ValueError(f'out_indices entries must be in [0, {self.num_stages}), got {self.out_indices}')
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

        if drop_path_rate is None:
            drop_path_rate = settings['drop_path_rate']
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f'drop_path_rate must be in [0, 1), got {drop_path_rate}')
        drop_paths = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        recompute_modes = resolve_recompute_ffn(recompute_ffn, self.num_stages)

        self.patch_embed = build_stem(self.embed_dims[0], norm_cfg)
        # Stages after the last returned one are not built: they would cost time and, unused, break DDP.
        last_stage = max(self.out_indices)
        self.stages = nn.ModuleList()
        for i in range(last_stage + 1):
            first = sum(self.depths[:i])
            self.stages.append(SecViTStage(
                self.embed_dims[i], self.depths[i], num_heads[i],
                out_dims=self.embed_dims[i + 1] if i < last_stage else None,
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
    def out_channels(self) -> Tuple[int, ...]:
        """Channels of each returned feature map (the outputs come in stage order)."""
        return tuple(self.embed_dims[i] for i in sorted(self.out_indices))

    def _freeze_stages(self):
        frozen = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        for i in range(min(self.frozen_stages, len(self.stages))):
            frozen.append(self.stages[i])
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'SecViT':
        """Switch mode, keeping frozen stages (and, with ``norm_eval``, batch norms) in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def init_weights(self) -> None:
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

    def check_input(self, x: Union[Tensor, torch.fx.Proxy]) -> None:
        """Raise ValueError unless ``x`` is a (B, 3, H, W) tensor with H, W >= :data:`MIN_INPUT_SIZE`.

        Args:
            x (Tensor | torch.fx.Proxy): The input; under torch.fx symbolic tracing (a Proxy) its shape is
                unknown and nothing is checked.
        """
        if isinstance(x, torch.fx.Proxy):
            return
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'SecViT expects a 4-D tensor of shape (B, 3, H, W), got {shape}')
        if x.shape[1] != 3:
            raise ValueError(f'SecViT expects 3 input channels, shape (B, 3, H, W); got {tuple(x.shape)}')
        if min(x.shape[2:]) < MIN_INPUT_SIZE:
            raise ValueError(f'SecViT needs H and W >= {MIN_INPUT_SIZE} (one token at stride 32), '
                             f'got input of shape {tuple(x.shape)}')

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """x: (B, 3, H, W). Returns a tuple of (B, C_i, ceil(H / s_i), ceil(W / s_i)) maps, s_i = 4 * 2**i."""
        self.check_input(x)
        # The stem runs channels-last (see docs/performance.md); permuted, its output is (B, H, W, C) contiguous.
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        x = x.permute(0, 2, 3, 1).contiguous()
        outs = []
        for i, stage in enumerate(self.stages):
            out, x = stage(x)
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(out).permute(0, 3, 1, 2).contiguous())
            if x is None:
                break
        return tuple(outs)
