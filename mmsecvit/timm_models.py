"""SecViT classifiers in timm's model registry: ``secvit_tiny``, ``secvit_small``, ``secvit_base``, ``secvit_large``.

``import mmsecvit`` imports this module when timm is installed, after which::

    model = timm.create_model('secvit_small', num_classes=1000)
    features = timm.create_model('secvit_small', features_only=True, out_indices=(1, 2, 3))

The models are :class:`mmsecvit.models.SecViTClassifier` (the same backbone code mmdet/mmseg use) with
the official parameter counts. No weights are hosted; load a local file, official or converted::

    timm.create_model('secvit_small', pretrained=True,
                      pretrained_cfg_overlay=dict(file='path/to/secvit_s_official.pth'))
    timm.create_model('secvit_small', checkpoint_path='path/to/converted_with_head.pth')
"""
from collections import OrderedDict
from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor

from .models.classifier import SecViTClassifier, to_classifier_state_dict
from .models.secvit import SecViTBlock
from .ops import ConvNormAct, rope_tables

__all__ = ['secvit_tiny', 'secvit_small', 'secvit_base', 'secvit_large']

# Leaves of torch.fx symbolic tracing (timm's fx feature extraction and fx tests). A block ranks its tokens by their
# content and its layers choose their implementation from the tensors they get; conv + norm layers fold their batch
# norm only when no gradient is recorded: traced through, these run-time choices would be frozen at trace time.
# The rotary tables are a Python object built from the map size.
register_notrace_module(SecViTBlock)
register_notrace_module(ConvNormAct)
register_notrace_function(rope_tables)


def checkpoint_filter_fn(state_dict: Dict[str, Tensor], model: SecViTClassifier) -> OrderedDict[str, Tensor]:
    """Accept official SecViT weights (and our converted layouts) when timm loads a pretrained file."""
    return to_classifier_state_dict(state_dict)


def _create_secvit(variant, arch, pretrained=False, **kwargs):
    return build_model_with_cfg(
        SecViTClassifier, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        arch=arch,
        **kwargs)


def _cfg(**kwargs):
    return dict(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation='bicubic',
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, fixed_input_size=False,
        first_conv='backbone.patch_embed.0.conv', classifier='head.fc',
        license='apache-2.0', paper_ids='arXiv:2405.13337', **kwargs)


default_cfgs = generate_default_cfgs({
    'secvit_tiny': _cfg(),
    'secvit_small': _cfg(),
    'secvit_base': _cfg(),
    'secvit_large': _cfg(),
})


@register_model
def secvit_tiny(pretrained: bool = False, **kwargs: Any) -> SecViTClassifier:
    """SecViT-T: 14,981,800 parameters, 82.6% ImageNet top-1 in the paper."""
    return _create_secvit('secvit_tiny', 'tiny', pretrained, **kwargs)


@register_model
def secvit_small(pretrained: bool = False, **kwargs: Any) -> SecViTClassifier:
    """SecViT-S: 26,776,104 parameters, 84.2% ImageNet top-1 in the paper."""
    return _create_secvit('secvit_small', 'small', pretrained, **kwargs)


@register_model
def secvit_base(pretrained: bool = False, **kwargs: Any) -> SecViTClassifier:
    """SecViT-B: 54,682,776 parameters, 85.0% ImageNet top-1 in the paper."""
    return _create_secvit('secvit_base', 'base', pretrained, **kwargs)


@register_model
def secvit_large(pretrained: bool = False, **kwargs: Any) -> SecViTClassifier:
    """SecViT-L: 96,495,096 parameters, 85.6% ImageNet top-1 in the paper."""
    return _create_secvit('secvit_large', 'large', pretrained, **kwargs)
