"""Convert an official SecViT classification checkpoint into mmsecvit's layout.

By default the output is a backbone-only state dict, which ``SecViT`` (and any mmdet/mmseg config using it)
loads with ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``. With ``--keep-head`` the classification
head is kept and the keys follow ``SecViTClassifier`` / the timm ``secvit_*`` models.

The input may be a bare state dict or a training checkpoint holding it under ``model``, ``state_dict`` or
(``--use-ema``) ``model_ema``. It is read with torch's safe loader (``weights_only=True``); the training
``args`` Namespace of official checkpoints is allowed. A file holding other Python objects is refused unless
``--trust-checkpoint`` is given, which unpickles it without restrictions: only for files you trust.

Example::

    python tools/model_converters/convert_checkpoint.py secvit_s_in1k.pth secvit_s_backbone.pth
"""
import argparse
import pickle
import re
from pathlib import Path

import torch

from mmsecvit.models import SecViT, SecViTClassifier
from mmsecvit.models.checkpoint_utils import (
    CLASSIFIER_HEAD_PREFIX,
    convert_official_state_dict,
    extract_state_dict,
    is_official_layout,
    to_backbone_state_dict,
)
from mmsecvit.models.classifier import to_classifier_state_dict
from mmsecvit.models.secvit import ARCH_SETTINGS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official SecViT checkpoint (.pth)')
    parser.add_argument('dst', help='output file')
    parser.add_argument('--keep-head', action='store_true',
                        help='keep the classification head (SecViTClassifier / timm secvit_* layout)')
    parser.add_argument('--use-ema', action='store_true', help='convert the EMA weights (model_ema)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='unpickle the file without weights_only protection (arbitrary code can run): '
                             'only for files from a trusted source that the safe loader refuses')
    return parser.parse_args(argv)


def load_checkpoint(path, trust_checkpoint=False):
    """Load ``path`` on the CPU, with torch's safe loader unless ``trust_checkpoint``.

    Raises:
        SystemExit: when the safe loader refuses the file; the message names ``--trust-checkpoint``.
    """
    if trust_checkpoint:
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        reason = re.search(r'WeightsUnpickler error: (.*?)(?: was not an allowed global|$)', str(error), re.M)
        raise SystemExit(
            f'Safe loading (weights_only=True) refused {path}: it holds Python objects other than tensors, '
            f'containers and the training args Namespace ({reason.group(1) if reason else error}). If you trust '
            f'the file, run again with --trust-checkpoint to unpickle it without restrictions.') from error


def detect_arch(backbone_state):
    """Name of the SecViT variant whose depths and widths the backbone weights have.

    Raises:
        SystemExit: when the weights match no variant.
    """
    depths, dims = [], []
    while f'stages.{len(dims)}.blocks.0.norm1.weight' in backbone_state:
        stage = len(dims)
        dims.append(backbone_state[f'stages.{stage}.blocks.0.norm1.weight'].numel())
        depths.append(len({k.split('.')[3] for k in backbone_state if k.startswith(f'stages.{stage}.blocks.')}))
    for name, settings in ARCH_SETTINGS.items():
        if tuple(settings['depths']) == tuple(depths) and tuple(settings['embed_dims']) == tuple(dims):
            return name
    raise SystemExit(f'The weights (embed dims {dims}, depths {depths}) match no SecViT variant of '
                     f'{sorted(ARCH_SETTINGS)}')


def dropped_keys(source, keep_head):
    """Official keys with no counterpart in the output: RoPE buffers (recomputed) and, unless kept, the head."""
    dropped = []
    for key, value in source.items():
        renamed = list(convert_official_state_dict({key: value}))  # empty for the buffers the model recomputes
        if not renamed or (not keep_head and renamed[0].startswith(CLASSIFIER_HEAD_PREFIX)):
            dropped.append(key)
    return dropped


def convert(source, keep_head=False):
    """Convert official weights and check that the result loads strictly into our model.

    Args:
        source (dict): An official SecViT state dict (unwrapped).
        keep_head (bool): Keep the classification head, in the SecViTClassifier layout.

    Returns:
        tuple[OrderedDict, str]: The converted state dict and the detected arch.
    """
    if not is_official_layout(source):
        raise SystemExit('The checkpoint is not in the official SecViT layout (no layers.* / patch_embed.proj.* '
                         f'keys; its keys look like {list(source)[:5]}). mmsecvit checkpoints need no conversion.')
    converted = convert_official_state_dict(source)
    backbone_state = to_backbone_state_dict(converted)
    arch = detect_arch(backbone_state)
    if keep_head:
        state_dict = to_classifier_state_dict(converted)
        num_classes = state_dict['head.fc.weight'].shape[0]
        SecViTClassifier(arch, num_classes=num_classes).load_state_dict(state_dict, strict=True)
    else:
        state_dict = backbone_state
        SecViT(arch, out_norm_cfg=None).load_state_dict(state_dict, strict=True)
    return state_dict, arch


def main(argv=None):
    args = parse_args(argv)
    checkpoint = load_checkpoint(args.src, args.trust_checkpoint)
    try:
        source = extract_state_dict(checkpoint, args.use_ema)
    except (KeyError, TypeError) as error:
        raise SystemExit(f'{args.src}: {error.args[0]}') from error
    state_dict, arch = convert(source, args.keep_head)
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': dict(arch=arch, source=str(args.src))}, args.dst)

    model = 'SecViTClassifier' if args.keep_head else 'SecViT'
    print(f"Read {len(source)} tensors of SecViT-{arch} ({'EMA' if args.use_ema else 'model'} weights) "
          f'from {args.src}')
    if not is_official_layout(checkpoint):
        print(f'  checkpoint entries: {", ".join(checkpoint)}; only the weights are converted')
    print(f"Wrote {len(state_dict)} tensors to {args.dst}; they load strictly into {model}('{arch}')")
    dropped = dropped_keys(source, args.keep_head)
    print(f'Dropped {len(dropped)} keys: {", ".join(dropped)}')
    if not args.keep_head:
        print('  (the classification head is dropped; --keep-head keeps it for SecViTClassifier / timm)')


if __name__ == '__main__':
    main()
