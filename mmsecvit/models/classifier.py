"""SecViT image classifier: the backbone plus the official classification head."""
import torch.nn as nn

from .secvit import SecViT, resolve_arch


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
        self.fc = nn.Linear(head_dims, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        """x: (B, C, H, W) last-stage map. Returns the pooled (B, head_dims) features."""
        return self.act(self.norm(self.proj(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.drop(self.forward_features(x)))


class SecViTClassifier(nn.Module):
    """SecViT for ImageNet-style classification, parameter for parameter the official model.

    Args:
        arch (str | dict): See :class:`SecViT`.
        num_classes (int): Classes of the head.
        head_dims (int): Channels of the head's projection.
        drop_rate (float): Dropout before the classifier.
        **backbone_kwargs: Other :class:`SecViT` arguments (clusters, drop path, ``with_cp``...).
    """

    def __init__(self, arch='small', num_classes=1000, head_dims=1024, drop_rate=0.0, **backbone_kwargs):
        super().__init__()
        backbone_kwargs.setdefault('out_indices', (len(resolve_arch(arch)['depths']) - 1,))
        self.backbone = SecViT(arch=arch, out_norm_cfg=None, **backbone_kwargs)
        self.backbone.init_weights()
        self.head = SecViTClassifierHead(self.backbone.embed_dims[-1], num_classes, head_dims, drop_rate)

    def forward_features(self, x):
        """Pooled (B, head_dims) features."""
        return self.head.forward_features(self.backbone(x)[-1])

    def forward(self, x):
        return self.head(self.backbone(x)[-1])
