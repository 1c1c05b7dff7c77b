"""Evaluate a checkpoint of a SecViT detector or segmentor on its config's test set.

    python tools/test.py CONFIG CHECKPOINT [--out RESULTS] [--show-dir DIR] [--work-dir DIR]
"""
import argparse
import os.path as osp

from mmsecvit.apis import build_runner_from_args, load_config
from mmsecvit.apis.runner import add_common_args, finish_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) a SecViT detector or segmentor')
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='detection: dump raw results to this .pkl file; segmentation: save '
                        'predicted masks as PNG files into this directory')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save images with predictions drawn into this directory '
                        '(relative paths go under the work dir)')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds between images with --show')
    add_common_args(parser)
    return parser.parse_args(argv)


def enable_visualization(cfg, args):
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show/--show-dir need default_hooks.visualization in the config')
    hook.draw = True
    hook.wait_time = args.wait_time
    if args.show:
        hook.show = True
    if args.show_dir and cfg.default_scope == 'mmseg':
        cfg.visualizer.save_dir = args.show_dir  # mmseg's SegVisualizationHook has no test_out_dir
    elif args.show_dir:
        hook.test_out_dir = args.show_dir


def add_result_dump(cfg, args):
    if cfg.default_scope == 'mmdet':
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError(f'--out for detection must be a .pkl file, got {args.out!r}')
        dump = dict(type='DumpDetResults', out_file_path=args.out)
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        cfg.test_evaluator = [*evaluators, dump]
    else:
        cfg.test_evaluator.output_dir = args.out
        cfg.test_evaluator.keep_results = True


def main(argv=None):
    args = parse_args(argv)
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'Checkpoint {args.checkpoint!r} does not exist')
    cfg = load_config(args.config, args.cfg_options)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        enable_visualization(cfg, args)
    if args.out:
        add_result_dump(cfg, args)
    runner = build_runner_from_args(cfg, args)
    metrics = runner.test()
    finish_distributed()
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return metrics


if __name__ == '__main__':
    main()
