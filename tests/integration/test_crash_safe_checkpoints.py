"""Checkpoints that survive a crash (mmsecvit.apis.checkpoints): atomic saving, resuming past a truncated
checkpoint, and tools/train.py killed with SIGKILL while training and while saving, then resumed."""
import argparse
import errno
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.fileio import LocalBackend
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.registry import DATASETS, HOOKS, MODELS
from torch.utils.data import Dataset

from mmsecvit.apis import build_runner_from_args
from mmsecvit.apis.checkpoints import unreadable_reason, use_safe_checkpoint_hook

from demo.coco import make_coco_demo

REPO = Path(__file__).resolve().parents[2]


@MODELS.register_module(force=True)
class CrashSafeToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, targets=None, mode='tensor'):
        outputs = self.linear(torch.stack(inputs))
        if mode == 'loss':
            return dict(loss=F.mse_loss(outputs, torch.stack(targets)))
        return outputs


@DATASETS.register_module(force=True)
class CrashSafeToyDataset(Dataset):
    """Four samples: two iterations per epoch at batch size 2."""
    metainfo = dict(classes=('toy',))

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return dict(inputs=torch.tensor([float(index), 1.0]), targets=torch.tensor([index / 4]))


@HOOKS.register_module(force=True)
class CheckpointListingHook(Hook):
    """Records, after each epoch's checkpoint is saved, which checkpoint files are there and whether each is
    intact."""
    priority = 'LOWEST'

    def __init__(self):
        self.listings = []

    def after_train_epoch(self, runner):
        self.listings.append([(path.name, unreadable_reason(str(path)) is None)
                              for path in checkpoint_files(runner.work_dir)])


def checkpoint_files(work_dir):
    """Every checkpoint or temporary checkpoint file in ``work_dir``."""
    return sorted(path for path in Path(work_dir).iterdir() if '.pth' in path.name)


def toy_config(work_dir, max_epochs, max_keep_ckpts=-1, **settings):
    """An mmengine runner config training the toy model with an epoch checkpoint after every epoch."""
    return Config(dict(
        default_scope='mmengine', experiment_name=f'toy_{uuid.uuid4().hex[:8]}', work_dir=str(work_dir),
        model=dict(type='CrashSafeToyModel'),
        train_dataloader=dict(dataset=dict(type='CrashSafeToyDataset'), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', by_epoch=True, milestones=[1]),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=max_keep_ckpts),
                           logger=dict(type='LoggerHook', interval=1)),
        **settings))


def build_toy_runner(cfg):
    return build_runner_from_args(cfg, argparse.Namespace(launcher='none', work_dir=None, config='toy.py'))


def truncate_to_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_plain_checkpoint_hook_is_made_safe_and_custom_hooks_are_left_alone():
    for hook, expected in [(dict(type='CheckpointHook', interval=2), 'SafeCheckpointHook'),
                           (dict(type='mmengine.CheckpointHook'), 'SafeCheckpointHook'),
                           (dict(type='MyCheckpointHook'), 'MyCheckpointHook')]:
        cfg = Config(dict(default_hooks=dict(checkpoint=hook, logger=dict(type='LoggerHook'))))
        use_safe_checkpoint_hook(cfg)
        assert cfg.default_hooks.checkpoint.type == expected and cfg.default_hooks.logger.type == 'LoggerHook'
    cfg = Config(dict(default_hooks=dict(checkpoint=None)))
    use_safe_checkpoint_hook(cfg)
    assert cfg.default_hooks.checkpoint is None
    cfg = Config(dict())  # mmengine's default checkpoint hook, made safe
    use_safe_checkpoint_hook(cfg)
    assert cfg.default_hooks.checkpoint == dict(type='SafeCheckpointHook', interval=1)


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    runner = build_toy_runner(toy_config(tmp_path, max_epochs=2, max_keep_ckpts=1))
    put = LocalBackend.put

    def write_half_then_fail(self, data, filepath):
        if os.path.basename(filepath).startswith('epoch_2.pth'):
            with open(filepath, 'wb') as file:
                file.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, 'No space left on device', filepath)
        put(self, data, filepath)

    monkeypatch.setattr(LocalBackend, 'put', write_half_then_fail)
    with pytest.raises(OSError, match='No space left on device'):
        runner.train()
    assert [path.name for path in checkpoint_files(tmp_path)] == ['epoch_1.pth']
    assert unreadable_reason(str(tmp_path / 'epoch_1.pth')) is None
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_1.pth')


def test_max_keep_ckpts_1_keeps_exactly_one_intact_checkpoint_after_each_save(tmp_path):
    runner = build_toy_runner(toy_config(tmp_path, max_epochs=3, max_keep_ckpts=1,
                                         custom_hooks=[dict(type='CheckpointListingHook')]))
    runner.train()
    listing_hook = next(hook for hook in runner.hooks if isinstance(hook, CheckpointListingHook))
    assert listing_hook.listings == [[('epoch_1.pth', True)], [('epoch_2.pth', True)], [('epoch_3.pth', True)]]
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_3.pth')


def test_auto_resume_skips_a_truncated_newest_checkpoint_and_says_so(tmp_path, capsys):
    build_toy_runner(toy_config(tmp_path, max_epochs=2)).train()
    newest, previous = tmp_path / 'epoch_2.pth', tmp_path / 'epoch_1.pth'
    truncate_to_half(newest)
    truncated_size = newest.stat().st_size
    capsys.readouterr()

    runner = build_toy_runner(toy_config(tmp_path, max_epochs=2, resume=True))
    out = capsys.readouterr().out
    assert f'Not resuming from {newest}: it cannot be read (RuntimeError: PytorchStreamReader' in out
    assert 'The file is left where it is' in out
    assert f'Resuming from {previous}, the newest intact checkpoint in {tmp_path}' in out
    assert newest.stat().st_size == truncated_size

    runner.train()
    assert 'resumed epoch: 1, iter: 2' in capsys.readouterr().out
    redone = torch.load(newest, map_location='cpu', weights_only=True)
    assert (redone['meta']['epoch'], redone['meta']['iter']) == (2, 4)


def test_resuming_from_a_corrupt_or_missing_checkpoint_fails_naming_it(tmp_path):
    build_toy_runner(toy_config(tmp_path, max_epochs=1)).train()
    corrupt = tmp_path / 'epoch_1.pth'
    truncate_to_half(corrupt)
    with pytest.raises(RuntimeError, match=rf"Cannot resume from '{re.escape(str(corrupt))}': it cannot be read "
                                           r'\(RuntimeError: PytorchStreamReader.*Pass an intact checkpoint'):
        build_toy_runner(toy_config(tmp_path, max_epochs=1, resume=True, load_from=str(corrupt)))
    missing = tmp_path / 'epoch_7.pth'
    with pytest.raises(FileNotFoundError, match=rf"'{re.escape(str(missing))}': the file does not exist"):
        build_toy_runner(toy_config(tmp_path, max_epochs=1, resume=True, load_from=str(missing)))
    with pytest.raises(RuntimeError, match=rf'no checkpoint in {re.escape(str(tmp_path))} is intact:\n'
                                           rf'  {re.escape(str(corrupt))}: it cannot be read'):
        build_toy_runner(toy_config(tmp_path, max_epochs=1, resume=True))
    assert corrupt.is_file()


# Imported by tools/train.py (custom_imports) in the end-to-end test. CRASH_AT='save:NAME' kills the process
# with SIGKILL halfway through writing the checkpoint file whose name starts with NAME (the temporary file of
# SafeCheckpointHook); CRASH_AT='iter:N' kills it just before training iteration N.
CRASH_POINTS = '''
import os
import signal

from mmengine.fileio import LocalBackend
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

CRASH_AT = os.environ.get('CRASH_AT', '')
put = LocalBackend.put


def put_and_die_halfway(self, data, filepath):
    if CRASH_AT.startswith('save:') and os.path.basename(filepath).startswith(CRASH_AT[len('save:'):]):
        with open(filepath, 'wb') as file:
            file.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    put(self, data, filepath)


LocalBackend.put = put_and_die_halfway


@HOOKS.register_module()
class CrashPointHook(Hook):
    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if CRASH_AT == f'iter:{runner.iter + 1}':
            os.kill(os.getpid(), signal.SIGKILL)
'''

# The demo Mask R-CNN, shrunk: SecViT with 8-64 channels, 64 px images, 2 iterations per epoch.
TINY_CONFIG = '''
_base_ = [{base!r}]
custom_imports = dict(imports=['mmsecvit', 'crash_points'], allow_failed_imports=False)
custom_hooks = [dict(type='CrashPointHook')]
data_root = {data_root!r}
model = dict(
    backbone=dict(arch=dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
                  cluster_size=16),
    neck=dict(in_channels=[8, 16, 32, 64], out_channels=16),
    rpn_head=dict(in_channels=16, feat_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(out_channels=16, roi_layer=dict(output_size=4)),
                  mask_roi_extractor=dict(out_channels=16),
                  bbox_head=dict(in_channels=16, fc_out_channels=16, roi_feat_size=4),
                  mask_head=dict(in_channels=16, conv_out_channels=16, num_convs=1)),
    train_cfg=dict(rpn=dict(sampler=dict(num=32)), rpn_proposal=dict(nms_pre=50, max_per_img=20),
                   rcnn=dict(sampler=dict(num=16))))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs'),
]
train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=3, val_begin=1000)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=1))
'''


def train_tool(config, work_dir, *options, crash_at=''):
    """Run tools/train.py with the crash points importable and one CPU thread."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(PYTHONPATH=str(config.parent), CRASH_AT=crash_at, OMP_NUM_THREADS='1')
    command = [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--work-dir', str(work_dir), *options]
    result = subprocess.run(command, cwd=config.parent, capture_output=True, text=True, env=env, timeout=300)
    return result, result.stdout + result.stderr


def checkpoint_meta(path):
    meta = torch.load(path, map_location='cpu', weights_only=True)['meta']
    return meta['epoch'], meta['iter']


def test_train_killed_while_saving_and_while_training_resumes_from_the_last_complete_checkpoint(tmp_path):
    data_root = tmp_path / 'coco_demo'
    make_coco_demo(str(data_root), num_train=4, num_val=2, image_size=(64, 64), object_size=(16, 32), seed=1)
    (tmp_path / 'crash_points.py').write_text(CRASH_POINTS)
    config = tmp_path / 'tiny_maskrcnn.py'
    config.write_text(TINY_CONFIG.format(base=str(REPO / 'configs' / 'detection' / 'maskrcnn_secvit_demo.py'),
                                         data_root=f'{data_root}/'))
    work_dir = tmp_path / 'work'

    # Killed halfway through writing epoch 2's checkpoint: epoch 1's, the only one kept, is still whole.
    killed, log = train_tool(config, work_dir, crash_at='save:epoch_2.pth')
    assert killed.returncode == -signal.SIGKILL, log[-3000:]
    assert [path.name for path in checkpoint_files(work_dir)] == ['epoch_1.pth', 'epoch_2.pth.saving']
    assert unreadable_reason(str(work_dir / 'epoch_2.pth.saving')) is not None
    assert checkpoint_meta(work_dir / 'epoch_1.pth') == (1, 2)
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'epoch_1.pth')

    # Resumed from epoch 1, then killed in the middle of epoch 3.
    killed, log = train_tool(config, work_dir, '--resume', crash_at='iter:6')
    assert killed.returncode == -signal.SIGKILL, log[-3000:]
    assert 'resumed epoch: 1, iter: 2' in log
    assert [path.name for path in checkpoint_files(work_dir)] == ['epoch_2.pth']
    assert checkpoint_meta(work_dir / 'epoch_2.pth') == (2, 4)
    assert (work_dir / 'last_checkpoint').read_text() == str(work_dir / 'epoch_2.pth')

    # Resumed from epoch 2, it finishes.
    finished, log = train_tool(config, work_dir, '--resume')
    assert finished.returncode == 0, log[-3000:]
    assert 'resumed epoch: 2, iter: 4' in log
    assert [path.name for path in checkpoint_files(work_dir)] == ['epoch_3.pth']
    assert checkpoint_meta(work_dir / 'epoch_3.pth') == (3, 6)
