"""Read SecViT weights: the official classification layout or our own, from any mmengine-loadable path."""
import logging
import re
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple, Union

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.runner.checkpoint import CheckpointLoader
from torch import Tensor
from torch.nn.modules.module import _IncompatibleKeys

# Official key -> our key. 1x1 convs become nn.Linear and layer scales become vectors, so those tensors
# are also reshaped (see convert_official_state_dict). The classification head goes under ``head.``.
_STEM_RENAMES = {'0': '0.conv', '1': '0.bn', '3': '1.conv', '4': '1.bn', '6': '2.conv', '7': '2.bn',
                 '9': '3.conv', '10': '3.bn'}
_OFFICIAL_RULES = [
    (r'^patch_embed\.proj\.(\d+)\.', lambda m: f'patch_embed.{_STEM_RENAMES[m.group(1)]}.'),
    (r'^layers\.(\d+)\.downsample\.reduction\.', r'stages.\1.downsample.conv.'),
    (r'^layers\.(\d+)\.downsample\.norm\.', r'stages.\1.downsample.bn.'),
    (r'^layers\.(\d+)\.blocks\.', r'stages.\1.blocks.'),
    (r'\.pos\.(conv\.)?', '.cpe.'),
    (r'\.norm([12])\.norm\.', r'.norm\1.'),
    (r'\.attn\.out_proj\.', '.attn.proj.'),
    (r'\.ffn\.dwconv\.conv\.', '.ffn.dwconv.'),
    (r'\.gamma_([12])$', r'.gamma\1'),
    (r'^proj\.', 'head.proj.'),
    (r'^norm\.', 'head.norm.'),
    (r'^head\.(weight|bias)$', r'head.fc.\1'),
]
_LINEAR_SUFFIXES = ('attn.qkv.weight', 'attn.proj.weight', 'ffn.fc1.weight', 'ffn.fc2.weight', 'head.fc.weight')
CLASSIFIER_HEAD_PREFIX = 'head.'


def is_official_layout(state_dict: Dict[str, Tensor]) -> bool:
    """True for the official SecViT key names (``layers.N...`` / ``patch_embed.proj.N...``)."""
    return any(key.startswith(('layers.', 'patch_embed.proj.')) for key in state_dict)


def convert_official_state_dict(state_dict: Dict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Rename and reshape an official SecViT state dict into the mmsecvit layout.

    Backbone keys come out as in :class:`mmsecvit.models.SecViT`; the classification head (1x1 proj,
    its norm and the classifier) comes out under ``head.proj``, ``head.norm`` and ``head.fc``.
    The rotary-embedding buffers (``layers.N.RoPE.angle``) are recomputed by the model and dropped.
    """
    converted = OrderedDict()
    for key, value in state_dict.items():
        if re.search(r'\.RoPE\.angle$', key):
            continue
        new_key = key
        for pattern, replacement in _OFFICIAL_RULES:
            new_key = re.sub(pattern, replacement, new_key)
        if new_key.endswith(_LINEAR_SUFFIXES) and value.dim() == 4:
            value = value.flatten(1)
        elif re.search(r'\.gamma[12]$', new_key):
            value = value.flatten()
        converted[new_key] = value
    return converted


def extract_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> OrderedDict[str, Tensor]:
    """Find the weights inside a loaded checkpoint and strip DDP ``module.`` prefixes.

    Args:
        checkpoint (dict): A loaded checkpoint: a bare state dict, or one wrapped in ``state_dict``,
            ``model`` or ``model_ema`` (the official training scripts' layout).
        use_ema (bool): Prefer the EMA weights when the checkpoint has them.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'Expected a checkpoint dict, got {type(checkpoint).__name__}')
    wrappers = ('model_ema', 'state_dict_ema') if use_ema else ('state_dict', 'model')
    state_dict = next((checkpoint[w] for w in wrappers if isinstance(checkpoint.get(w), dict)), None)
    if state_dict is None:
        if use_ema:
            raise KeyError(f'No EMA weights (model_ema / state_dict_ema) in checkpoint; it has {sorted(checkpoint)}')
        state_dict = checkpoint
    return OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state_dict.items())


def to_backbone_state_dict(state_dict: Dict[str, Tensor], prefix: Optional[str] = None) -> OrderedDict[str, Tensor]:
    """Backbone weights from an official, mmsecvit classifier, mmdet/mmseg or bare backbone state dict."""
    if is_official_layout(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    if prefix is None:
        prefix = 'backbone.' if any(k.startswith('backbone.') for k in state_dict) else ''
    elif not prefix.endswith('.'):
        prefix += '.'
    if prefix:
        state_dict = OrderedDict((k[len(prefix):], v) for k, v in state_dict.items() if k.startswith(prefix))
    return OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith(CLASSIFIER_HEAD_PREFIX))


def unbuilt_prefixes(model: nn.Module) -> Tuple[str, ...]:
    """Key prefixes of the layers a backbone does not build: the stages after its last output, the
    downsampling after it, and the output norms of stages it does not return."""
    last = len(model.stages) - 1
    return ((f'stages.{last}.downsample.',) + tuple(f'stages.{i}.' for i in range(last + 1, model.num_stages))
            + tuple(f'norm{i}.' for i in range(model.num_stages) if i not in model.out_indices))


def load_backbone_checkpoint(model: nn.Module, filename: str, prefix: Optional[str] = None, use_ema: bool = False,
                             logger: Optional[Union[logging.Logger, str]] = 'current') -> _IncompatibleKeys:
    """Load a checkpoint into a SecViT backbone, reporting what did not match.

    Raises:
        ValueError: when no key matches the model, or when matching keys have other shapes (for example
            the checkpoint of another variant); the message lists the offending keys.
    """
    checkpoint = CheckpointLoader.load_checkpoint(filename, map_location='cpu', logger=logger)
    state_dict = to_backbone_state_dict(extract_state_dict(checkpoint, use_ema), prefix)
    own = model.state_dict()
    matched = [k for k in state_dict if k in own]
    if not matched:
        raise ValueError(f'No key of checkpoint {filename} matches the SecViT backbone. Checkpoint keys look like '
                         f'{list(state_dict)[:5]}, model keys like {list(own)[:5]}')
    wrong_shape = [f'{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}'
                   for k in matched if state_dict[k].shape != own[k].shape]
    if wrong_shape:
        raise ValueError(f'Checkpoint {filename} does not fit this SecViT arch; shape mismatch in '
                         f'{len(wrong_shape)} keys, e.g. ' + '; '.join(wrong_shape[:5]))
    result = model.load_state_dict(state_dict, strict=False)
    output_norms = tuple(f'norm{i}.' for i in range(len(model.stages)))
    missing = [k for k in result.missing_keys if not k.startswith(output_norms)]
    if missing:
        print_log(f'Missing keys (left as initialised) in {filename}: {missing}', logger, level=logging.WARNING)
    unbuilt = unbuilt_prefixes(model)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(unbuilt)]
    if unexpected:
        print_log(f'Unexpected keys (ignored) in {filename}: {unexpected}', logger, level=logging.WARNING)
    print_log(f'Loaded {len(matched)} of {len(own)} SecViT tensors from {filename}', logger)
    return result
