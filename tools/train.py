"""Train a SecViT detector or segmentor from an mmdet or mmseg config.

    python tools/train.py configs/detection/maskrcnn_secvit_s.py [--work-dir DIR] [--resume [CKPT]] [--amp]
"""
import argparse

import torch

from mmsecvit.apis import build_runner_from_args, load_config
from mmsecvit.apis.runner import add_common_args, check_pretrained, finish_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a SecViT detector or segmentor')
    parser.add_argument('config', help='train config file')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or from the newest intact checkpoint in the work dir if '
                             'none given (unreadable ones are skipped)')
    parser.add_argument('--amp', action='store_true',
                        help='automatic mixed precision (fp16 with dynamic loss scaling; needs a GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the actual batch size over auto_scale_lr.base_batch_size')
    add_common_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.amp and not torch.cuda.is_available():
        raise SystemExit('--amp needs a GPU: mmengine\'s AmpOptimWrapper runs on CUDA (or NPU/MLU/MUSA) devices '
                         'only. Train without --amp on the CPU.')
    cfg = load_config(args.config, args.cfg_options)
    check_pretrained(cfg)
    if args.amp:
        wrapper = cfg.optim_wrapper
        if wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP is already enabled in the config')
        else:
            wrapper.type = 'AmpOptimWrapper'
            wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg or 'base_batch_size' not in cfg.auto_scale_lr:
            raise ValueError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    runner = build_runner_from_args(cfg, args)
    runner.train()
    finish_distributed()


if __name__ == '__main__':
    main()
