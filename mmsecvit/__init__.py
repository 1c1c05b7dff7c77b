"""mmsecvit: SecViT backbones for mmdetection and mmsegmentation.

Importing the package registers ``SecViT`` in mmengine's root MODELS registry, which mmdet's and
mmseg's registries fall back to, so ``dict(type='SecViT', ...)`` builds from either. It also lets
torch's safe checkpoint loading read mmengine's checkpoints (see :mod:`mmsecvit.safe_checkpoints`).
"""
from .models import SecViT, SecViTClassifier
from .safe_checkpoints import allow_mmengine_checkpoints
from .version import __version__

allow_mmengine_checkpoints()

__all__ = ['SecViT', 'SecViTClassifier', '__version__']
