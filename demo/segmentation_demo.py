"""Segmentation demo on the CPU: make the synthetic ADE20K-layout set if it is missing, train a small SecViT
UperNet on it, report mIoU from mmseg's IoUMetric and save the predicted masks of a few val images under
the work dir.

    python demo/segmentation_demo.py [--config ...] [--data-root data/ade_demo/ADEChallengeData2016]
        [--work-dir work_dirs/seg_demo] [--iters N] [--num-pictures 4] [--seed 0]
"""
import argparse
import os
import os.path as osp
import time
from glob import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ade import make_ade_demo  # demo/ is the script's directory

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'configs' / 'segmentation' / 'upernet_secvit_ade_demo.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=str(DEFAULT_CONFIG), help='demo config')
    parser.add_argument('--data-root', default='data/ade_demo/ADEChallengeData2016',
                        help='where the demo set is (generated if absent)')
    parser.add_argument('--work-dir', default='work_dirs/seg_demo', help='logs, checkpoint and predictions go here')
    parser.add_argument('--iters', type=int, help='training iterations (default: the config\'s)')
    parser.add_argument('--num-pictures', type=int, default=4, help='val images to save predicted masks of')
    parser.add_argument('--seed', type=int, default=0, help='seed of the data and of training')
    return parser.parse_args(argv)


def save_predictions(model, image_dir, palette, out_dir, count):
    """Save the colour-coded prediction of the first ``count`` images as ``out_dir/<name>_pred.png``."""
    from mmseg.apis import inference_model
    os.makedirs(out_dir, exist_ok=True)
    colours = np.array(list(palette) + [[0, 0, 0]], np.uint8)  # ignore (255) -> black
    written = []
    for path in sorted(glob(osp.join(image_dir, '*.jpg')))[:count]:
        labels = inference_model(model, path).pred_sem_seg.data[0].numpy()
        out = osp.join(out_dir, osp.splitext(osp.basename(path))[0] + '_pred.png')
        Image.fromarray(colours[np.minimum(labels, len(colours) - 1)]).save(out)
        written.append(out)
    return written


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    if osp.isdir(osp.join(args.data_root, 'images', 'validation')):
        print(f'Demo set found in {args.data_root}')
    else:
        counts = make_ade_demo(args.data_root, seed=args.seed)
        print(f'Generated the demo set in {args.data_root}: {counts} images')

    from mmsecvit.apis import build_runner_from_args, load_config
    cfg = load_config(args.config)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = args.data_root
    if args.iters:
        cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = args.iters
        cfg.default_hooks.checkpoint.interval = args.iters
        cfg.param_scheduler[-1].end = args.iters
    cfg.randomness = dict(seed=args.seed)
    print(f'Training {osp.basename(args.config)} for {cfg.train_cfg.max_iters} iterations on '
          f'{torch.get_num_threads()} CPU threads')
    runner = build_runner_from_args(cfg, argparse.Namespace(launcher='none', work_dir=args.work_dir,
                                                            config=args.config))
    runner.train()
    metrics = runner.val_loop.run()
    print(f'Validation (mmseg IoUMetric): mIoU {metrics["mIoU"]:.2f}%, aAcc {metrics["aAcc"]:.2f}%')
    model = runner.model.eval()
    model.cfg = cfg
    pictures = save_predictions(model, osp.join(args.data_root, 'images', 'validation'),
                                runner.val_dataloader.dataset.metainfo['palette'],
                                osp.join(args.work_dir, 'predictions'), args.num_pictures)
    print(f'Predicted masks of {len(pictures)} val images in {osp.join(args.work_dir, "predictions")}')
    print(f'Done in {time.perf_counter() - start:.0f} s; checkpoint and logs in {args.work_dir}')
    return metrics


if __name__ == '__main__':
    main()
