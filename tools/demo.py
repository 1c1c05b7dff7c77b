"""Train and evaluate a SecViT Mask R-CNN on the embedded synthetic demo set, on the CPU.

Generates the set under data/coco_demo/ if it is missing (COCO layout, deterministic from --seed),
trains configs/detection/maskrcnn_secvit_demo.py with mmengine's runner, evaluates bbox and segm mAP
with mmdet's CocoMetric on the val split, and draws the predictions of a few val images.

    python tools/demo.py [--work-dir work_dirs/demo] [--epochs N] [--seed 0]
"""
import argparse
import os.path as osp
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'configs' / 'detection' / 'maskrcnn_secvit_demo.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=str(DEFAULT_CONFIG), help='demo config')
    parser.add_argument('--data-root', default='data/coco_demo', help='where the demo set is (generated if absent)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='logs, checkpoint and pictures go here')
    parser.add_argument('--epochs', type=int, help='override the config\'s number of epochs')
    parser.add_argument('--num-pictures', type=int, default=4, help='val images to draw predictions on')
    parser.add_argument('--seed', type=int, default=0, help='seed of the data and of training')
    return parser.parse_args(argv)


def draw_predictions(runner, cfg, out_dir, count):
    """Draw the model's boxes and masks on the first ``count`` val images; return the files written."""
    import mmcv
    from mmdet.apis import inference_detector
    from mmdet.registry import VISUALIZERS

    model = runner.model
    model.cfg = cfg
    model.eval()
    visualizer = VISUALIZERS.build(dict(type='DetLocalVisualizer', name='demo_visualizer'))
    visualizer.dataset_meta = runner.val_dataloader.dataset.metainfo
    dataset = runner.val_dataloader.dataset
    written = []
    for index in range(min(count, len(dataset))):
        path = dataset.get_data_info(index)['img_path']
        result = inference_detector(model, path)
        out_file = osp.join(out_dir, osp.basename(path))
        visualizer.add_datasample(osp.basename(path), mmcv.imread(path, channel_order='rgb'), result,
                                  draw_gt=False, pred_score_thr=0.5, out_file=out_file)
        written.append(out_file)
    return written


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    from mmsecvit.demo.coco import demo_exists, make_coco_demo

    if demo_exists(args.data_root):
        print(f'Demo set found in {args.data_root}')
    else:
        counts = make_coco_demo(args.data_root, seed=args.seed)
        print(f'Generated the demo set in {args.data_root}: {counts} instances '
              f'({time.perf_counter() - start:.0f} s)')

    from mmengine.runner import Runner

    from mmsecvit.apis import load_config
    cfg = load_config(args.config)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = args.data_root
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = osp.join(
        args.data_root, 'annotations/instances_val2017.json')
    if args.epochs:
        cfg.train_cfg.max_epochs = args.epochs
    cfg.train_cfg.val_interval = cfg.train_cfg.max_epochs  # evaluate once, after the last epoch
    cfg.work_dir = args.work_dir
    cfg.randomness = dict(seed=args.seed)

    runner = Runner.from_cfg(cfg)
    runner.train()
    train_time = time.perf_counter() - start
    metrics = {key[len('val/'):]: buffer.current() for key, buffer in runner.message_hub.log_scalars.items()
               if key.startswith('val/coco/')}
    pictures = draw_predictions(runner, cfg, osp.join(args.work_dir, 'predictions'), args.num_pictures)

    print('\nDemo results on the val split (mmdet CocoMetric):')
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        print(f'  {key:18s} {metrics[key]:.3f}')
    print(f'Training took {train_time / 60:.1f} min, everything {(time.perf_counter() - start) / 60:.1f} min.')
    print(f'Predictions drawn on {len(pictures)} val images in {osp.dirname(pictures[0]) if pictures else "-"}')
    print(f'Checkpoint and logs in {args.work_dir}')
    return metrics


if __name__ == '__main__':
    main()
