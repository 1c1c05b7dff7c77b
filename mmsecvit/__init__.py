"""mmsecvit: SecViT backbones for mmdetection and mmsegmentation.

Importing the package registers ``SecViT`` in mmengine's root MODELS registry, which mmdet's and
mmseg's registries fall back to, so ``dict(type='SecViT', ...)`` builds from either. It also lets
torch's safe checkpoint loading read mmengine's checkpoints (see :mod:`mmsecvit.safe_checkpoints`).
With timm installed, it registers the ``secvit_*`` classifiers in timm (see :mod:`mmsecvit.timm_models`).
"""
from .models import SecViT, SecViTClassifier
from .safe_checkpoints import allow_mmengine_checkpoints
from .version import __version__

allow_mmengine_checkpoints()

try:  # with timm installed, register secvit_tiny/small/base/large in timm's model registry
    from . import timm_models  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != 'timm':
        raise

__all__ = ['SecViT', 'SecViTClassifier', '__version__']
