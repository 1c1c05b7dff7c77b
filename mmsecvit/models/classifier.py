"""SecViT image classifier: the backbone plus the official classification head.

:class:`SecViTClassifier` also speaks timm's model interface (``forward_features``/``forward_head``,
``reset_classifier``, ``feature_info``, ``forward_intermediates``...) without importing timm; the timm
registrations in :mod:`mmsecvit.timm_models` build exactly this class.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint_utils import CLASSIFIER_HEAD_PREFIX, convert_official_state_dict, is_official_layout
from .secvit import SecViT, resolve_arch

BACKBONE_PREFIX = 'backbone.'
GLOBAL_POOLS = ('avg', '')  # timm's global_pool values the head takes: average pooling, none


class SecViTClassifierHead(nn.Module):
    """1x1 conv to ``head_dims``, batch norm, Swish, global average pool, linear classifier.

    Args:
        in_dims (int): Channels of the last stage.
        num_classes (int): Classes; 0 returns the pre-logits features.
        head_dims (int): Channels of the projection before pooling; 0 for no projection (the head of a
            pruned model).
        drop_rate (float): Dropout before the classifier.
        global_pool (str): 'avg', or '' for no pooling: features and logits stay (B, C, H, W) maps.
    """

    def __init__(self, in_dims: int, num_classes: int = 1000, head_dims: int = 1024, drop_rate: float = 0.0,
                 global_pool: str = 'avg'):
        super().__init__()
        self.hidden_size = head_dims or in_dims
        self.proj = nn.Conv2d(in_dims, head_dims, 1) if head_dims else None
        self.norm = nn.BatchNorm2d(head_dims) if head_dims else None
        self.act = nn.SiLU() if head_dims else None
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, global_pool)

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (0: none); ``global_pool`` None keeps the pooling."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"SecViT's head average-pools ('avg') or does not pool (''); "
                                 f'global_pool={global_pool!r} is not supported')
            self.global_pool = global_pool
        self.fc = build_classifier(self.hidden_size, num_classes)

    def pre_logits(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) last-stage map. Returns the pooled (B, hidden_size) features, or without pooling
        the (B, hidden_size, H, W) map."""
        if self.proj is not None:
            x = self.act(self.norm(self.proj(x)))
        return x.mean(dim=(2, 3)) if self.global_pool else x

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pre_logits(x)
        if pre_logits:
            return x
        x = self.drop(x)
        if self.global_pool:
            return self.fc(x)
        return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # unpooled: logits at every position


def build_classifier(in_features: int, num_classes: int) -> nn.Module:
    """Linear layer to ``num_classes``, or identity for ``num_classes == 0``."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def resolve_feature_indices(num_stages: int, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """Stage indices to return, in timm's convention.

    Args:
        num_stages (int): Stages of the model.
        indices (int | Sequence[int] | None): None for all stages, an int ``n`` for the last ``n`` stages,
            or explicit indices (negative ones count from the end).

    Returns:
        list[int]: Absolute, non-negative stage indices.
    """
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f'Cannot take the last {indices} of {num_stages} stages')
        return list(range(num_stages - indices, num_stages))
    absolute = [i + num_stages if i < 0 else i for i in indices]
    if not absolute or not all(0 <= i < num_stages for i in absolute):
        raise ValueError(f'Stage indices must be in [-{num_stages}, {num_stages}), got {tuple(indices)}')
    return absolute


class SecViTClassifier(nn.Module):
    """SecViT for ImageNet-style classification, parameter for parameter the official model.

    The backbone is :class:`SecViT` without output norms (returning all stages, which costs no
    parameters), so ``model.backbone`` carries exactly the weights an mmdet/mmseg ``SecViT`` loads.

    Args:
        arch (str | dict): See :class:`SecViT`.
        num_classes (int): Classes of the head; 0 makes ``forward`` return the pre-logits features.
        global_pool (str): 'avg', or '' for no pooling (timm's unpooled head: (B, C, H, W) features and logits).
        in_chans (int): Input channels; SecViT takes RGB only (3).
        head_dims (int): Channels of the head's projection; 0 for none (pooling and classifier on the last stage).
        drop_rate (float): Dropout before the classifier.
        device (torch.device | str | None): Device of the parameters; None for the default device.
        dtype (torch.dtype | None): Floating-point type of the parameters; None for the default.
        **backbone_kwargs: Other :class:`SecViT` arguments (clusters, drop path, ``with_cp``...).
    """

    def __init__(self, arch: Union[str, dict] = 'small', num_classes: int = 1000, global_pool: str = 'avg',
                 in_chans: int = 3, head_dims: int = 1024, drop_rate: float = 0.0,
                 device: Optional[Union[torch.device, str]] = None, dtype: Optional[torch.dtype] = None,
                 **backbone_kwargs: Any):
        super().__init__()
        if in_chans != 3:
            raise ValueError(f'SecViT takes RGB input (in_chans=3), got in_chans={in_chans}')
        self.in_chans = in_chans
        num_stages = len(resolve_arch(arch)['depths'])
        self.backbone = SecViT(arch=arch, out_indices=tuple(range(num_stages)), out_norm_cfg=None, **backbone_kwargs)
        self.backbone.init_weights()
        self.num_classes = num_classes
        self.num_features = self.backbone.embed_dims[-1]
        self.head = SecViTClassifierHead(self.num_features, num_classes, head_dims, drop_rate, global_pool)
        self.head_hidden_size = self.head.hidden_size
        self.feature_info = [dict(num_chs=dims, reduction=4 * 2 ** i, module=f'backbone.stages.{i}')
                             for i, dims in enumerate(self.backbone.embed_dims)]
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward_features(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W). Returns the last stage's (B, C, H / 32, W / 32) map."""
        return self.backbone(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the last-stage map and classify; ``pre_logits`` returns the pooled (B, head_hidden_size) features
        (with ``global_pool=''`` both stay (B, C, H, W) maps)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier by a new one for ``num_classes`` (0: none), on the model's device and dtype.

        Args:
            num_classes (int): New number of classes.
            global_pool (str | None): 'avg' or '' (no pooling); None keeps the current pooling.
        """
        self.head.reset(num_classes, global_pool)
        reference = next(self.parameters())
        self.head.fc.to(device=reference.device, dtype=reference.dtype).train(self.head.training)
        self.num_classes = num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of every block (the backbone's ``with_cp``)."""
        for stage in self.backbone.stages:
            stage.with_cp = enable

    def forward_intermediates(self, x: Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (timm's feature extraction interface).

        Args:
            x (Tensor): (B, 3, H, W) images.
            indices (int | Sequence[int] | None): Stages to return; see :func:`resolve_feature_indices`.
            norm (bool): Accepted for timm's interface; SecViT has no norm on its stage outputs.
            stop_early (bool): Make the last taken stage's map the final one (SecViT still runs every stage).
            output_fmt (str): Must be 'NCHW'.
            intermediates_only (bool): Return only the stage outputs.

        Returns:
            list[Tensor] | tuple[Tensor, list[Tensor]]: The (B, C_i, H / s_i, W / s_i) stage maps, after
            the final map (the last stage's, see ``stop_early``) when ``intermediates_only`` is False.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'SecViT returns NCHW stage outputs, got output_fmt={output_fmt!r}')
        take_indices = resolve_feature_indices(len(self.feature_info), indices)
        stages = self.backbone(x)
        intermediates = [stages[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return (stages[max(take_indices)] if stop_early else stages[-1]), intermediates

    def prune_intermediate_layers(self, indices: Optional[Union[int, Sequence[int]]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and its downsampling) and the head.

        ``forward_features`` then ends at that stage; with ``prune_head`` the head is replaced by one without
        projection or classifier (``reset_classifier`` can add one on the stage's channels).

        Args:
            indices (int | Sequence[int] | None): Stages that will be taken.
            prune_norm (bool): Accepted for timm's interface; SecViT has no final norm to prune.
            prune_head (bool): Remove the classification head.

        Returns:
            list[int]: The absolute stage indices.
        """
        take_indices = resolve_feature_indices(len(self.feature_info), indices)
        last = max(take_indices)
        self.backbone.stages = self.backbone.stages[:last + 1]
        self.backbone.stages[last].downsample = None
        self.backbone.out_indices = tuple(range(last + 1))
        self.feature_info = self.feature_info[:last + 1]
        self.num_features = self.feature_info[last]['num_chs']
        if prune_head:
            self.head = SecViTClassifierHead(self.num_features, 0, 0, self.head.drop.p, '').train(self.training)
            self.num_classes = 0
            self.head_hidden_size = self.num_features
        return take_indices


def to_classifier_state_dict(state_dict: Dict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Weights in the :class:`SecViTClassifier` (and timm model) layout.

    Args:
        state_dict (dict): An official SecViT state dict, or one converted to our layout with the head
            (backbone keys unprefixed, head under ``head.``), or one already in the classifier layout.
    """
    if is_official_layout(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    if any(key.startswith(BACKBONE_PREFIX) for key in state_dict):
        return OrderedDict(state_dict)
    return OrderedDict((key if key.startswith(CLASSIFIER_HEAD_PREFIX) else BACKBONE_PREFIX + key, value)
                       for key, value in state_dict.items())
