"""What tools/train.py and tools/test.py share: loading a config with clear errors and building the runner.

Works for mmdet and mmseg configs alike; the config's ``default_scope`` says which.
"""
import argparse
import os
import os.path as osp
from typing import Optional

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .checkpoints import resolve_resume_checkpoint, use_safe_checkpoint_hook

SCOPES = ('mmdet', 'mmseg')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='directory for logs and checkpoints (default: ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, e.g. train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher for distributed runs')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Load a config, apply overrides and import its custom modules, with errors that say what to fix."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'Config file {path!r} does not exist (looked from {os.getcwd()})')
    try:
        cfg = Config.fromfile(path)
    except (SyntaxError, NameError, KeyError, ImportError) as error:
        raise ValueError(f'Could not load config {path!r}: {type(error).__name__}: {error}') from error
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(f"Config {path!r} has default_scope={scope!r}; expected one of {SCOPES} "
                         "(inherit from an mmdet:: or mmseg:: base config)")
    import mmsecvit  # noqa: F401  registers SecViT even when the config forgot custom_imports
    check_data_roots(cfg)
    return cfg


def _dataset_roots(dataset):
    """data_root and annotation file of a (possibly wrapped) dataset config."""
    while 'dataset' in dataset:
        dataset = dataset['dataset']
    if 'datasets' in dataset:
        for sub in dataset['datasets']:
            yield from _dataset_roots(sub)
        return
    yield dataset.get('data_root', ''), dataset.get('ann_file', '')


def check_data_roots(cfg: Config) -> None:
    """Fail early, with the path to fix, when a dataloader points at data that is not there."""
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if not cfg.get(loader):
            continue
        for root, ann_file in _dataset_roots(cfg[loader]['dataset']):
            if root and not osp.isdir(root):
                raise FileNotFoundError(
                    f'{loader}: data_root {root!r} does not exist. Put the dataset there (layouts: docs/detection.md, '
                    f'docs/segmentation.md) or pass --cfg-options {loader}.dataset.data_root=/path/to/data')
            ann_path = ann_file if osp.isabs(ann_file) else osp.join(root or '', ann_file)
            if ann_file and osp.splitext(ann_file)[1] and not osp.isfile(ann_path):
                raise FileNotFoundError(f'{loader}: annotation file {ann_path!r} does not exist')


def check_pretrained(cfg: Config) -> None:
    """Fail before training, with what to do, when the backbone's pretrained checkpoint file is missing."""
    init_cfg = cfg.model.get('backbone', {}).get('init_cfg') or {}
    path = init_cfg.get('checkpoint') if init_cfg.get('type') == 'Pretrained' else None
    if path and '://' not in path and not osp.isfile(path):
        raise FileNotFoundError(
            f'Pretrained backbone checkpoint {path!r} does not exist (looked from {os.getcwd()}). Download the '
            'official ImageNet checkpoint (docs/detection.md, docs/pretrained.md), or pass --cfg-options '
            'model.backbone.init_cfg.checkpoint=/path/to/it, or model.backbone.init_cfg=None to train from scratch')


def default_work_dir(config_path: str) -> str:
    return osp.join('./work_dirs', osp.splitext(osp.basename(config_path))[0])


def setup_cpu_distributed(cfg: Config) -> None:
    """torchrun without CUDA: a gloo process group (mmengine's launcher would select a CUDA device) and
    DDP without device ids."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group('gloo')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    cfg.model_wrapper_cfg = dict(type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                                 find_unused_parameters=cfg.get('find_unused_parameters', False))


def finish_distributed() -> None:
    """Tear the process group down before exit (gloo processes exiting with it alive can abort)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def build_runner_from_args(cfg: Config, args: argparse.Namespace) -> Runner:
    """Apply the command-line settings shared by train and test, then build the runner.

    Checkpoints are saved crash-safely (mmengine's plain CheckpointHook becomes ``SafeCheckpointHook``), and a
    resume starts from an intact checkpoint (see :mod:`mmsecvit.apis.checkpoints`).

    Args:
        cfg (Config): The loaded config; changed in place.
        args (argparse.Namespace): ``launcher``, ``work_dir`` and ``config`` from the command line.
    """
    import torch
    cfg.launcher = args.launcher
    if args.launcher == 'pytorch' and not torch.cuda.is_available():
        setup_cpu_distributed(cfg)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or default_work_dir(args.config)
    use_safe_checkpoint_hook(cfg)
    resume_warnings = resolve_resume_checkpoint(cfg)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    for warning in resume_warnings:
        runner.logger.warning(warning)
    return runner
