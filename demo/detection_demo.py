"""Detection demo on the CPU: make the synthetic COCO-layout set if it is missing, train a small SecViT
Mask R-CNN on it, report bbox and segm mAP from mmdet's CocoMetric and draw the predictions of a few val
images under the work dir.

    python demo/detection_demo.py [--config ...] [--data-root data/coco_demo] [--work-dir work_dirs/demo]
        [--epochs N] [--num-pictures 4] [--seed 0]
"""
import argparse
import os.path as osp
import time
from pathlib import Path

from coco import demo_exists, make_coco_demo  # demo/ is the script's directory

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'configs' / 'detection' / 'maskrcnn_secvit_demo.py'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=str(DEFAULT_CONFIG), help='demo config')
    parser.add_argument('--data-root', default='data/coco_demo', help='where the demo set is (generated if absent)')
    parser.add_argument('--work-dir', default='work_dirs/demo', help='logs, checkpoint and predictions go here')
    parser.add_argument('--epochs', type=int, help='training epochs (default: the config\'s)')
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
    if demo_exists(args.data_root):
        print(f'Demo set found in {args.data_root}')
    else:
        counts = make_coco_demo(args.data_root, seed=args.seed)
        print(f'Generated the demo set in {args.data_root}: {counts} instances '
              f'({time.perf_counter() - start:.0f} s)')

    from mmsecvit.apis import build_runner_from_args, load_config
    cfg = load_config(args.config)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].dataset.data_root = args.data_root
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = osp.join(
        args.data_root, 'annotations/instances_val2017.json')
    if args.epochs:
        cfg.train_cfg.max_epochs = args.epochs
    cfg.train_cfg.val_interval = cfg.train_cfg.max_epochs  # evaluate once, after the last epoch
    cfg.randomness = dict(seed=args.seed)

    runner = build_runner_from_args(cfg, argparse.Namespace(launcher='none', work_dir=args.work_dir,
                                                            config=args.config))
    runner.train()
    train_time = time.perf_counter() - start
    metrics = {key[len('val/'):]: buffer.current() for key, buffer in runner.message_hub.log_scalars.items()
               if key.startswith('val/coco/')}
    pictures = draw_predictions(runner, cfg, osp.join(args.work_dir, 'predictions'), args.num_pictures)

    print('\nDemo results on the val split (mmdet CocoMetric):')
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        print(f'  {key:18s} {metrics[key]:.3f}')
    print(f'Training took {train_time / 60:.1f} min, everything {(time.perf_counter() - start) / 60:.1f} min.')
    print(f'Predictions drawn on {len(pictures)} val images in {osp.join(args.work_dir, "predictions")}')
    print(f'Checkpoint and logs in {args.work_dir}')
    return metrics


if __name__ == '__main__':
    main()
