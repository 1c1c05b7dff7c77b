"""Segmentation demo on the CPU: make the synthetic ADE20K-layout set, train a small SecViT UperNet on it,
report mIoU from mmseg's IoUMetric and save a few predicted masks next to the validation images.

    python tools/seg_demo.py [--config configs/segmentation/upernet_secvit_ade_demo.py] [--iters N]
"""
import argparse
import os.path as osp
import time
from glob import glob

import numpy as np
import torch
from mmengine.config import Config
from mmengine.runner import Runner
from PIL import Image

from mmsecvit.apis import load_config
from mmsecvit.demo.ade import make_ade_demo

CONFIG = 'configs/segmentation/upernet_secvit_ade_demo.py'


def save_predictions(model, image_dir, palette, count):
    """Save the colour-coded prediction of the first ``count`` images as ``<name>_pred.png`` beside them."""
    from mmseg.apis import inference_model
    paths = sorted(glob(osp.join(image_dir, '*.jpg')))[:count]
    colours = np.array(list(palette) + [[0, 0, 0]], np.uint8)  # ignore (255) -> black
    for path in paths:
        labels = inference_model(model, path).pred_sem_seg.data[0].numpy()
        out = osp.splitext(path)[0] + '_pred.png'
        Image.fromarray(colours[np.minimum(labels, len(colours) - 1)]).save(out)
        print(f'  saved {out}')
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--iters', type=int, help='training iterations (default: the config\'s)')
    parser.add_argument('--work-dir', default='work_dirs/seg_demo')
    parser.add_argument('--seed', type=int, default=0, help='seed of the generated data')
    parser.add_argument('--num-masks', type=int, default=4, help='predicted masks to save')
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data_root = Config.fromfile(args.config).data_root
    if not osp.isdir(osp.join(data_root, 'images', 'validation')):
        print(f'Generating the demo set in {data_root}')
        make_ade_demo(data_root, seed=args.seed)
    cfg = load_config(args.config)
    if args.iters:
        cfg.train_cfg.max_iters = cfg.train_cfg.val_interval = args.iters
        cfg.default_hooks.checkpoint.interval = args.iters
        cfg.param_scheduler[-1].end = args.iters
    cfg.work_dir = args.work_dir
    print(f'Training {osp.basename(args.config)} for {cfg.train_cfg.max_iters} iterations on '
          f'{torch.get_num_threads()} CPU threads')
    runner = Runner.from_cfg(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    print(f'Validation (mmseg IoUMetric): mIoU {metrics["mIoU"]:.2f}%, aAcc {metrics["aAcc"]:.2f}%')
    model = runner.model.eval()
    model.cfg = cfg
    print('Predicted masks:')
    save_predictions(model, osp.join(data_root, 'images', 'validation'),
                     runner.val_dataloader.dataset.metainfo['palette'], args.num_masks)
    print(f'Done in {time.perf_counter() - start:.0f} s; checkpoint in {args.work_dir}')
    return metrics


if __name__ == '__main__':
    main()
