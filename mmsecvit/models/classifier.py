"""SecViT image classifier: the backbone plus the official classification head.

:class:`SecViTClassifier` also speaks timm's model interface (``forward_features``/``forward_head``,
``reset_classifier``, ``feature_info``, ``forward_intermediates``...) without importing timm; the timm
registrations in :mod:`mmsecvit.timm_models` build exactly this class.
"""
from collections import OrderedDict

import torch.nn as nn

from .checkpoint_utils import CLASSIFIER_HEAD_PREFIX, convert_official_state_dict, is_official_layout
from .secvit import SecViT, resolve_arch

BACKBONE_PREFIX = 'backbone.'


class SecViTClassifierHead(nn.Module):
    """1x1 conv to ``head_dims``, batch norm, Swish, global average pool, linear classifier.

    Args:
        in_dims (int): Channels of the last stage.
        num_classes (int): Classes; 0 returns the pooled features.
        head_dims (int): Channels of the projection before pooling.
        drop_rate (float): Dropout before the classifier.
    """

    def __init__(self, in_dims, num_classes=1000, head_dims=1024, drop_rate=0.0):
        super().__init__()
        self.proj = nn.Conv2d(in_dims, head_dims, 1)
        self.norm = nn.BatchNorm2d(head_dims)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(drop_rate)
        self.fc = build_classifier(head_dims, num_classes)

    def pre_logits(self, x):
        """x: (B, C, H, W) last-stage map. Returns the pooled (B, head_dims) features."""
        return self.act(self.norm(self.proj(x))).mean(dim=(2, 3))

    def forward(self, x, pre_logits=False):
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(self.drop(x))


def build_classifier(in_features, num_classes):
    """Linear layer to ``num_classes``, or identity for ``num_classes == 0``."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def resolve_feature_indices(num_stages, indices):
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
        num_classes (int): Classes of the head; 0 makes ``forward`` return the pooled features.
        head_dims (int): Channels of the head's projection.
        drop_rate (float): Dropout before the classifier.
        **backbone_kwargs: Other :class:`SecViT` arguments (clusters, drop path, ``with_cp``...).
    """

    def __init__(self, arch='small', num_classes=1000, head_dims=1024, drop_rate=0.0, **backbone_kwargs):
        super().__init__()
        num_stages = len(resolve_arch(arch)['depths'])
        self.backbone = SecViT(arch=arch, out_indices=tuple(range(num_stages)), out_norm_cfg=None, **backbone_kwargs)
        self.backbone.init_weights()
        self.num_classes = num_classes
        self.num_features = self.backbone.embed_dims[-1]
        self.head_hidden_size = head_dims
        self.head = SecViTClassifierHead(self.num_features, num_classes, head_dims, drop_rate)
        self.feature_info = [dict(num_chs=dims, reduction=4 * 2 ** i, module=f'backbone.stages.{i}')
                             for i, dims in enumerate(self.backbone.embed_dims)]

    def forward_features(self, x):
        """x: (B, 3, H, W). Returns the last stage's (B, C, H / 32, W / 32) map."""
        return self.backbone(x)[-1]

    def forward_head(self, x, pre_logits=False):
        """Pool the last-stage map and classify; ``pre_logits`` returns the pooled (B, head_dims) features."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.head.fc

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace the classifier by a new one for ``num_classes`` (0: none).

        Args:
            num_classes (int): New number of classes.
            global_pool (str | None): Only average pooling exists; None or 'avg'.
        """
        if global_pool not in (None, 'avg'):
            raise ValueError(f"SecViT's head always average-pools; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.head.fc = build_classifier(self.head_hidden_size, num_classes).to(self.head.proj.weight)

    def set_grad_checkpointing(self, enable=True):
        """Gradient checkpointing of every block (the backbone's ``with_cp``)."""
        for stage in self.backbone.stages:
            stage.with_cp = enable

    def forward_intermediates(self, x, indices=None, norm=False, output_fmt='NCHW', intermediates_only=False):
        """Stage outputs (timm's feature extraction interface).

        Args:
            x (Tensor): (B, 3, H, W) images.
            indices (int | Sequence[int] | None): Stages to return; see :func:`resolve_feature_indices`.
            norm (bool): Must be False: SecViT has no norm on its stage outputs.
            output_fmt (str): Must be 'NCHW'.
            intermediates_only (bool): Return only the stage outputs.

        Returns:
            list[Tensor] | tuple[Tensor, list[Tensor]]: The (B, C_i, H / s_i, W / s_i) stage maps, after
            the last-stage map when ``intermediates_only`` is False.
        """
        if norm or output_fmt != 'NCHW':
            raise ValueError(f'SecViT returns un-normalised NCHW stage outputs; got norm={norm}, '
                             f'output_fmt={output_fmt!r}')
        stages = self.backbone(x)
        intermediates = [stages[i] for i in resolve_feature_indices(len(self.feature_info), indices)]
        return intermediates if intermediates_only else (stages[-1], intermediates)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the stages after the last one in ``indices`` (and its downsampling) and the head.

        Args:
            indices (int | Sequence[int] | None): Stages that will be taken.
            prune_norm (bool): Accepted for timm's interface; SecViT has no final norm to prune.
            prune_head (bool): Replace the classification head by nothing.

        Returns:
            list[int]: The absolute stage indices.
        """
        take_indices = resolve_feature_indices(len(self.feature_info), indices)
        last = max(take_indices)
        self.backbone.stages = self.backbone.stages[:last + 1]
        self.backbone.stages[last].downsample = None
        self.feature_info = self.feature_info[:last + 1]
        if prune_head:
            self.head = nn.Identity()
        return take_indices


def to_classifier_state_dict(state_dict):
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
