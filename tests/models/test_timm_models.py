import argparse
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from mmdet.registry import MODELS

from mmsecvit.models import SecViTClassifier

from helpers import load_tool, one_torch_thread
from official_reference import (
    OFFICIAL_PARAMS,
    num_params,
    official_model,
    official_training_checkpoint,
    randomize_norms,
)

convert_checkpoint = load_tool('model_converters/convert_checkpoint')
single_torch_thread = pytest.fixture(autouse=True)(one_torch_thread)



@pytest.mark.parametrize('arch', ['tiny', 'small', 'base', 'large'])
def test_every_variant_has_the_official_parameter_count(arch):
    model = timm.create_model(f'secvit_{arch}', num_classes=1000)
    assert isinstance(model, SecViTClassifier)
    assert num_params(model) == OFFICIAL_PARAMS[arch]
    cfg = model.pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224) and cfg['num_classes'] == 1000
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert not cfg.get('url') and not cfg.get('hf_hub_id')


def test_variants_are_registered_on_import():
    assert timm.list_models('secvit_*') == ['secvit_base', 'secvit_large', 'secvit_small', 'secvit_tiny']
    with pytest.raises(RuntimeError, match='No pretrained weights exist for secvit_tiny'):
        timm.create_model('secvit_tiny', pretrained=True)
    with pytest.raises(ValueError, match='in_chans=3'):
        timm.create_model('secvit_tiny', in_chans=1)


def test_mmsecvit_imports_without_timm():
    script = textwrap.dedent('''
        import importlib.abc
        import sys

        class TimmNotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split('.')[0] == 'timm':
                    raise ModuleNotFoundError(f'No module named {name!r}', name=name)

        sys.meta_path.insert(0, TimmNotInstalled())
        import mmsecvit
        print(mmsecvit.SecViT('tiny').out_channels, 'mmsecvit.timm_models' in sys.modules)
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '(64, 128, 256, 512) False'


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (1, 2, 3), (0, 1)])
def test_features_only_matches_the_mmdet_backbone(out_indices):
    backbone = MODELS.build(dict(type='SecViT', arch='tiny', out_indices=out_indices, out_norm_cfg=None)).eval()
    randomize_norms(backbone)
    features = timm.create_model('secvit_tiny', features_only=True, out_indices=out_indices).eval()
    result = features.model.backbone.load_state_dict(backbone.state_dict(), strict=False)
    last = max(out_indices)
    assert result.missing_keys == []
    assert all(k.startswith(tuple(f'stages.{i}.' for i in range(last + 1, 4)) + (f'stages.{last}.downsample',))
               for k in result.unexpected_keys)
    assert features.feature_info.channels() == [(64, 128, 256, 512)[i] for i in out_indices]
    assert features.feature_info.reduction() == [4 * 2 ** i for i in out_indices]
    assert not any(name.startswith('model.head') for name, _ in features.named_parameters())

    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected, actual = backbone(x), features(x)
    assert len(actual) == len(expected) == len(out_indices)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_classifier_interface():
    model = timm.create_model('secvit_tiny', num_classes=1000).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feature_map = model.forward_features(x)
        assert feature_map.shape == (2, 512, 2, 3) and model.num_features == 512
        pooled = model.forward_head(feature_map, pre_logits=True)
        assert pooled.shape == (2, 1024) and model.head_hidden_size == 1024
        torch.testing.assert_close(model(x), model.get_classifier()(pooled))
        last, intermediates = model.forward_intermediates(x, indices=2)
        assert [t.shape[1] for t in intermediates] == [256, 512] and torch.equal(last, feature_map)

        model.reset_classifier(10)
        assert model(x).shape == (2, 10) and model.num_classes == 10
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
    with pytest.raises(ValueError, match="global_pool='max' is not supported"):
        model.reset_classifier(10, global_pool='max')
    model.set_grad_checkpointing()
    assert all(stage.with_cp for stage in model.backbone.stages)


def test_unpooled_head_keeps_maps_and_classifies_every_position():
    model = timm.create_model('secvit_tiny', num_classes=10, global_pool='').eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
        assert pre_logits.shape == (2, 1024, 2, 3) and logits.shape == (2, 10, 2, 3)
        torch.testing.assert_close(logits.mean((2, 3)), model.get_classifier()(pre_logits.mean((2, 3))))
        model.reset_classifier(0, 'avg')
        torch.testing.assert_close(model(x), pre_logits.mean((2, 3)))


def test_device_and_dtype_arguments_and_the_meta_device():
    model = timm.create_model('secvit_tiny', device='meta', dtype=torch.float64)
    tensors = dict(model.named_parameters(), **dict(model.named_buffers()))
    assert all(t.is_meta for t in tensors.values())
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float64}
    with torch.device('meta'):
        model = SecViTClassifier('tiny')
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_pruned_model_ends_at_the_taken_stage():
    model = timm.create_model('secvit_tiny', num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tap = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        final, intermediates = model.forward_intermediates(x, indices=[1], norm=True, stop_early=True)
        assert torch.equal(final, tap) and torch.equal(intermediates[0], tap)
        assert model.prune_intermediate_layers([-3]) == [1]
        assert model.num_classes == 0 and model.num_features == model.head_hidden_size == 128
        assert model.backbone.out_channels == (64, 128) and not model.head.training
        torch.testing.assert_close(model(x), tap)
        model.reset_classifier(7, 'avg')
        torch.testing.assert_close(model(x), model.get_classifier()(tap.mean((2, 3))))


def test_converted_and_official_checkpoints_give_official_logits(tmp_path):
    # Float64: SEC's argsort is discontinuous, float32 rounding could swap near-tied tokens between clusters.
    official = official_training_checkpoint(tmp_path / 'official.pth').eval().double()
    convert_checkpoint.main([str(tmp_path / 'official.pth'), str(tmp_path / 'converted.pth'), '--keep-head'])
    from_converted = timm.create_model('secvit_tiny', checkpoint_path=str(tmp_path / 'converted.pth'))
    # timm's pretrained-file loading prefers the EMA weights of a training checkpoint.
    official_ema = official_model('tiny').eval().double()
    official_ema.load_state_dict(torch.load(tmp_path / 'official.pth')['model_ema'])
    from_official = timm.create_model('secvit_tiny', pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(tmp_path / 'official.pth')))
    x = torch.randn(2, 3, 96, 112, dtype=torch.double)
    with torch.no_grad():
        for model, reference in ((from_converted, official), (from_official, official_ema)):
            torch.testing.assert_close(model.eval().double()(x), reference(x))


def test_timm_training_checkpoint_initialises_the_mmdet_backbone(tmp_path):
    # timm's train.py saves the model under state_dict (and state_dict_ema) beside its args Namespace.
    model = timm.create_model('secvit_tiny', num_classes=10).eval()
    randomize_norms(model)
    torch.save({'arch': 'secvit_tiny', 'state_dict': model.state_dict(), 'args': argparse.Namespace(lr=1e-3)},
               tmp_path / 'timm_checkpoint.pth')
    backbone = MODELS.build(dict(type='SecViT', arch='tiny', out_norm_cfg=None, init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'timm_checkpoint.pth')))).eval()
    backbone.init_weights()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for actual, expected in zip(backbone(x), model.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(actual, expected)
