import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm

from mmsecvit.apis import load_config
from mmsecvit.apis.runner import check_pretrained

from demo.coco import CLASSES, make_coco_demo

REPO = Path(__file__).resolve().parents[2]
DETECTION_CONFIGS = sorted((REPO / 'configs' / 'detection').glob('*.py'))
DEMO_CONFIG = REPO / 'configs' / 'detection' / 'maskrcnn_secvit_demo.py'
EXPECTED = {f'maskrcnn_secvit_{v}.py' for v in 'tsbl'} | {f'retinanet_secvit_{v}.py' for v in 'tsbl'} | {
    'maskrcnn_secvit_s_3x.py', 'maskrcnn_secvit_b_3x.py', 'cascade_maskrcnn_secvit_s_3x.py',
    'cascade_maskrcnn_secvit_b_3x.py'}


def test_every_config_of_the_issue_exists():
    assert EXPECTED <= {p.name for p in DETECTION_CONFIGS}


@pytest.mark.parametrize('config', DETECTION_CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_runs_loss_and_predict(config):
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(config))
    assert cfg.model.backbone.type == 'SecViT'
    assert cfg.model.backbone.cluster_size > 0 or cfg.model.backbone.get('num_clusters')
    cfg.model.backbone.init_cfg = None  # the ImageNet checkpoint is not shipped
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    neck_in = cfg.model.neck.in_channels
    assert list(neck_in) == [model.backbone.embed_dims[i] for i in model.backbone.out_indices][-len(neck_in):]

    packed = demo_mm_inputs(batch_size=1, image_shapes=[(3, 72, 100)], num_items=[2], num_classes=3,
                            with_mask=True)
    model.train()
    losses = model(**model.data_preprocessor(packed, True), mode='loss')
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode='predict')
    assert len(results) == 1 and results[0].pred_instances.bboxes.shape[-1] == 4


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('coco_demo')
    make_coco_demo(str(root), num_train=8, num_val=4, image_size=(96, 96), object_size=(16, 40), seed=1)
    return root


def demo_options(root, epochs, batch_size=4):
    return ['--cfg-options', f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}',
            f'val_evaluator.ann_file={root}/annotations/instances_val2017.json',
            f'test_evaluator.ann_file={root}/annotations/instances_val2017.json',
            f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
            f'train_dataloader.batch_size={batch_size}', 'default_hooks.checkpoint.interval=1',
            'default_hooks.checkpoint.max_keep_ckpts=3']


def run_tool(args, cwd, env=None):
    """Run a tool with the repository neither as the working directory nor on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'} | (env or {})
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_train_resume_test_and_safe_loading(demo_root, tmp_path):
    work_dir = tmp_path / 'work'
    train = [sys.executable, str(REPO / 'tools' / 'train.py'), str(DEMO_CONFIG), '--work-dir', str(work_dir)]
    first = run_tool(train + demo_options(demo_root, epochs=1), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (work_dir / 'epoch_1.pth').is_file()

    # An interrupted run continues from its last checkpoint: same iteration, optimizer and scheduler state.
    second = run_tool(train + ['--resume'] + demo_options(demo_root, epochs=2), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'resumed epoch: 1' in second.stdout + second.stderr
    one = torch.load(work_dir / 'epoch_1.pth', map_location='cpu')
    two = torch.load(work_dir / 'epoch_2.pth', map_location='cpu')  # safe loading, left on
    assert two['meta']['epoch'] == 2 and two['meta']['iter'] == 2 * one['meta']['iter']
    steps = [state['step'] for state in two['optimizer']['state'].values()]
    assert all(int(step) == two['meta']['iter'] for step in steps)
    assert two['param_schedulers'][-1]['last_step'] == 2 > one['param_schedulers'][-1]['last_step'] == 1
    assert 'coco/bbox_mAP' in second.stdout + second.stderr

    # tools/test.py evaluates the saved checkpoint, dumps results and draws predictions.
    out = tmp_path / 'results.pkl'
    test = [sys.executable, str(REPO / 'tools' / 'test.py'), str(DEMO_CONFIG), str(work_dir / 'epoch_2.pth'),
            '--work-dir', str(work_dir), '--out', str(out), '--show-dir', 'vis'] + demo_options(demo_root, 2)
    tested = run_tool(test, cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert "'coco/bbox_mAP'" in tested.stdout and "'coco/segm_mAP'" in tested.stdout
    with open(out, 'rb') as f:
        assert len(pickle.load(f)) == 4
    assert len(list(work_dir.glob('*/vis/*.png'))) == 4

    # A checkpoint that carries pickled code is refused, and the code does not run.
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': Exploit(str(marker))}, evil)
    refused = run_tool(test[:3] + [str(evil)] + test[4:], cwd=tmp_path)
    assert refused.returncode != 0 and 'Weights only load failed' in refused.stderr
    assert not marker.exists()


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f'touch {self.path}',))


def test_two_process_training_on_cpu(demo_root, tmp_path):
    work_dir = tmp_path / 'dist'
    result = run_tool(['bash', str(REPO / 'tools' / 'dist_train.sh'), str(DEMO_CONFIG), '2', '--work-dir',
                       str(work_dir)] + demo_options(demo_root, epochs=1, batch_size=2),
                      cwd=tmp_path, env={'PYTHON': sys.executable, 'PORT': '29517'})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work_dir / 'epoch_1.pth').is_file()
    assert 'Distributed training: True' in result.stdout + result.stderr


def test_errors_say_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_config(str(tmp_path / 'no_such_config.py'))
    with pytest.raises(FileNotFoundError, match=r"data_root .*missing_coco.* does not exist.*--cfg-options"):
        load_config(str(DEMO_CONFIG), {'train_dataloader.dataset.data_root': str(tmp_path / 'missing_coco')})
    (tmp_path / 'ann').mkdir()
    with pytest.raises(FileNotFoundError, match=r'annotation file .*instances_train2017.json.* does not exist'):
        load_config(str(DEMO_CONFIG), {'train_dataloader.dataset.data_root': str(tmp_path),
                                       'val_dataloader.dataset.data_root': str(tmp_path),
                                       'test_dataloader.dataset.data_root': str(tmp_path)})
    broken = tmp_path / 'typo.py'
    broken.write_text("_base_ = ['mmdet::_base_/models/mask-rcnn_r50_fpn.py']\nmodel = dict(backbone=dict(\n")
    with pytest.raises(ValueError, match='Could not load config'):
        load_config(str(broken))
    with pytest.raises(FileNotFoundError, match=r"secvit_s_in1k.pth' does not exist.*init_cfg=None"):
        check_pretrained(Config.fromfile(str(REPO / 'configs' / 'detection' / 'maskrcnn_secvit_s.py')))


def test_demo_set_is_coco_and_deterministic(tmp_path):
    from mmdet.datasets import CocoDataset
    counts = make_coco_demo(str(tmp_path / 'a'), num_train=5, num_val=3, seed=3)
    make_coco_demo(str(tmp_path / 'b'), num_train=5, num_val=3, seed=3)
    for name in ('annotations/instances_train2017.json', 'train2017/000000000001.png'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    dataset = CocoDataset(data_root=str(tmp_path / 'a'), ann_file='annotations/instances_val2017.json',
                          data_prefix=dict(img='val2017/'), metainfo=dict(classes=CLASSES), pipeline=[])
    instances = [i for d in dataset for i in d['instances']]
    assert len(dataset) == 3 and len(instances) == counts['val']
    assert all(len(i['mask'][0]) >= 6 and i['bbox'][2] > i['bbox'][0] for i in instances)


def test_amp_without_gpu_says_so(tmp_path):
    result = run_tool([sys.executable, str(REPO / 'tools' / 'train.py'), str(DEMO_CONFIG), '--amp'], cwd=tmp_path)
    assert result.returncode != 0 and '--amp needs a GPU' in result.stderr and 'Train without --amp' in result.stderr
