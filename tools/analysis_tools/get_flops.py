"""FLOPs (multiply-adds) and parameters of SecViT models, attention matmuls counted and shown apart.

The official figures (2.5 / 4.4 / 9.7 / 18.1 GFLOPs for the classifiers at 224) correspond to the
column without attention matmuls.

    # the 4 classifiers at 224 and backbones at 800x1344
    python tools/analysis_tools/get_flops.py
    # one ImageNet classifier (official clusters)
    python tools/analysis_tools/get_flops.py --arch small --shape 224 224
    # a config's backbone
    python tools/analysis_tools/get_flops.py configs/detection/maskrcnn_secvit_s.py --shape 800 1344
"""
import argparse

from mmsecvit.flops import count_flops
from mmsecvit.models import SecViT, SecViTClassifier

ARCHS = ('tiny', 'small', 'base', 'large')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', nargs='?', help='mmdet/mmseg config whose model.backbone is a SecViT')
    parser.add_argument('--arch', choices=ARCHS, help='count this ImageNet classifier (official cluster counts)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), help='input size')
    parser.add_argument('--cluster-size', type=int, default=98,
                        help='tokens per cluster of the backbones in the default table (default 98)')
    return parser.parse_args(argv)


def backbone_from_config(path):
    from mmengine.config import Config
    from mmengine.registry import MODELS
    cfg = Config.fromfile(path)
    backbone = dict(cfg.model.backbone, init_cfg=None)
    if backbone.get('type') != 'SecViT':
        raise SystemExit(f"{path}: model.backbone.type is {backbone.get('type')!r}, not 'SecViT'")
    return MODELS.build(backbone)


def line(name, shape, model):
    c = count_flops(model, (3, *shape))
    return (f'| {name} | {shape[0]}x{shape[1]} | {c.flops / 1e9:.2f} | {c.attention_flops / 1e9:.2f} | '
            f'{c.flops_without_attention / 1e9:.2f} | {c.params / 1e6:.2f} |')


def main(argv=None):
    args = parse_args(argv)
    rows = ['| model | input | GFLOPs | of which attention | GFLOPs without attention | params (M) |',
            '|---|---|---|---|---|---|']
    if args.config:
        shape = tuple(args.shape or (800, 1344))
        rows.append(line(f'{args.config} backbone', shape, backbone_from_config(args.config)))
    elif args.arch:
        shape = tuple(args.shape or (224, 224))
        rows.append(line(f'SecViT-{args.arch} classifier', shape, SecViTClassifier(args.arch)))
    else:
        for arch in ARCHS:
            rows.append(line(f'SecViT-{arch} classifier', (224, 224), SecViTClassifier(arch)))
        for arch in ARCHS:
            rows.append(line(f'SecViT-{arch} backbone, cluster_size {args.cluster_size}', (800, 1344),
                             SecViT(arch, cluster_size=args.cluster_size)))
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
