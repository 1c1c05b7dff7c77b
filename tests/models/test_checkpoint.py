import io
import logging

import pytest
import torch
from mmengine.logging import MMLogger

from mmsecvit.models import SecViT, convert_official_state_dict
from mmsecvit.models.checkpoint_utils import extract_state_dict

from official_reference import official_model, randomize_norms


@pytest.fixture
def mmengine_log():
    """Text logged through mmengine's current logger during the test."""
    logger = MMLogger.get_current_instance()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


@pytest.fixture
def official(tmp_path):
    model = official_model('tiny').eval()
    randomize_norms(model)
    path = tmp_path / 'secvit_t_official.pth'
    torch.save({'model': model.state_dict(), 'epoch': 300}, path)
    return model, path


def test_pretrained_init_cfg_reads_official_layout(official):
    model, path = official
    ours = SecViT('tiny', out_norm_cfg=None, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    ours.init_weights()
    ours.eval().double()
    x = torch.randn(1, 3, 128, 96, dtype=torch.double)
    with torch.no_grad():
        for a, e in zip(ours(x), model.double().forward_stages(x)):
            torch.testing.assert_close(a, e)


def test_pretrained_init_cfg_reads_own_and_detector_layouts(tmp_path):
    source = SecViT('tiny')
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}}, tmp_path / 'det.pth')
    torch.save(source.state_dict(), tmp_path / 'bare.pth')
    for name in ('det.pth', 'bare.pth'):
        target = SecViT('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / name)))
        target.init_weights()
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value, msg=key)


def test_full_checkpoint_loads_silently_into_a_backbone_with_fewer_stages(tmp_path, mmengine_log):
    source = SecViT('tiny')
    torch.save(source.state_dict(), tmp_path / 'full.pth')
    target = SecViT('tiny', out_indices=(0, 1), init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'full.pth')))
    target.init_weights()
    log = mmengine_log.getvalue()
    assert 'Unexpected keys' not in log and 'Missing keys' not in log
    for key, value in target.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key], msg=key)


def test_partial_checkpoint_reports_missing_and_unexpected_keys(official, mmengine_log):
    _, path = official
    state = torch.load(path)['model']
    del state['layers.0.blocks.0.attn.qkv.weight']
    state['layers.0.blocks.0.extra.weight'] = torch.zeros(1)
    torch.save(state, path)
    SecViT('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    log = mmengine_log.getvalue()
    assert "Missing keys (left as initialised) in" in log and "['stages.0.blocks.0.attn.qkv.weight']" in log
    assert "Unexpected keys (ignored) in" in log and "['stages.0.blocks.0.extra.weight']" in log


def test_mismatched_checkpoint_names_the_keys(tmp_path, official):
    _, path = official
    with pytest.raises(ValueError, match=r'shape mismatch in \d+ keys, e\.g\. patch_embed\.0\.conv\.weight: '
                       r'checkpoint \(32, 3, 3, 3\) vs model \(40, 3, 3, 3\)'):
        SecViT('base', init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()
    torch.save({'encoder.weight': torch.zeros(2)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match=r"No key.*encoder\.weight"):
        SecViT('tiny', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'other.pth'))).init_weights()


def test_converter_maps_every_official_key():
    state = official_model('base').state_dict()
    converted = convert_official_state_dict(state)
    backbone = {k for k in converted if not k.startswith('head.')}
    assert backbone == set(SecViT('base', out_norm_cfg=None).state_dict())
    assert {k for k in converted if k.startswith('head.')} == {
        'head.proj.weight', 'head.proj.bias', 'head.fc.weight', 'head.fc.bias', 'head.norm.weight',
        'head.norm.bias', 'head.norm.running_mean', 'head.norm.running_var', 'head.norm.num_batches_tracked'}
    assert converted['stages.2.blocks.0.gamma1'].shape == (320,)
    assert converted['stages.0.blocks.0.attn.qkv.weight'].shape == (240, 80)


def test_extract_state_dict_unwraps_and_strips_ddp_prefix():
    weights = {'module.layers.0.x': torch.zeros(1)}
    assert list(extract_state_dict({'state_dict': weights})) == ['layers.0.x']
    ema = {'model': {'a': torch.zeros(1)}, 'model_ema': {'b': torch.zeros(1)}}
    assert list(extract_state_dict(ema)) == ['a']
    assert list(extract_state_dict(ema, use_ema=True)) == ['b']
    with pytest.raises(KeyError, match='No EMA'):
        extract_state_dict({'model': {}}, use_ema=True)


class AttributeLookup:
    """Pickles as ``getattr(owner, name)``, as mmengine's HistoryBuffer pickles its statistics methods."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_safe_loading_resolves_only_history_buffer_statistics():
    import io
    import pickle

    from mmengine.logging.history_buffer import HistoryBuffer
    buffer = io.BytesIO()
    torch.save({'min': AttributeLookup(HistoryBuffer, 'min'), 'log': HistoryBuffer([1.0, 3.0], [1, 1])}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)  # weights_only=True, the default
    assert loaded['min'] is HistoryBuffer.min and loaded['log'].max() == 3.0
    buffer = io.BytesIO()
    torch.save({'x': AttributeLookup(HistoryBuffer, '__init__')}, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError, match=r"attribute '__init__'.*only allows HistoryBuffer"):
        torch.load(buffer)
