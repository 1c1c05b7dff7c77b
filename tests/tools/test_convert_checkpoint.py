
import pytest
import torch

from mmsecvit.models import SecViT, SecViTClassifier, convert_official_state_dict

from helpers import load_tool, one_torch_thread
from official_reference import official_model, official_training_checkpoint

convert_checkpoint = load_tool('model_converters/convert_checkpoint')


single_torch_thread = pytest.fixture(autouse=True)(one_torch_thread)


class TrainingState:
    """Stands for any custom object a training script might pickle into a checkpoint."""


def assert_stages_match_official(backbone, official, size=(96, 64)):
    x = torch.randn(1, 3, *size, dtype=torch.double)
    with torch.no_grad():
        for actual, expected in zip(backbone.eval().double()(x), official.double().forward_stages(x)):
            torch.testing.assert_close(actual, expected)


def test_backbone_conversion_gives_official_stage_outputs(tmp_path, capsys):
    official = official_training_checkpoint(tmp_path / 'official.pth')
    convert_checkpoint.main([str(tmp_path / 'official.pth'), str(tmp_path / 'backbone.pth')])
    report = capsys.readouterr().out
    assert 'Read 332 tensors of SecViT-tiny (model weights)' in report
    assert 'checkpoint entries: model, model_ema, optimizer, epoch, args' in report
    assert "Wrote 319 tensors" in report and "load strictly into SecViT('tiny')" in report
    assert 'Dropped 13 keys: layers.0.RoPE.angle, layers.1.RoPE.angle' in report
    assert 'proj.weight' in report and 'head.bias' in report

    converted = torch.load(tmp_path / 'backbone.pth')
    assert converted['meta']['arch'] == 'tiny'
    assert set(converted['state_dict']) == set(SecViT('tiny', out_norm_cfg=None).state_dict())
    init_cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'backbone.pth'))
    backbone = SecViT('tiny', out_norm_cfg=None, init_cfg=init_cfg)
    backbone.init_weights()
    assert_stages_match_official(backbone, official)


def test_init_cfg_reads_official_training_checkpoint_directly(tmp_path):
    # The official file holds the training args as an argparse.Namespace; safe loading accepts it.
    official = official_training_checkpoint(tmp_path / 'official.pth')
    init_cfg = dict(type='Pretrained', checkpoint=str(tmp_path / 'official.pth'))
    backbone = SecViT('tiny', out_norm_cfg=None, init_cfg=init_cfg)
    backbone.init_weights()
    assert_stages_match_official(backbone, official, size=(64, 96))


@pytest.mark.parametrize('arch', ['tiny', 'base'])
def test_keep_head_round_trips_every_tensor(tmp_path, capsys, arch):
    official = official_training_checkpoint(tmp_path / 'official.pth', arch)
    convert_checkpoint.main([str(tmp_path / 'official.pth'), str(tmp_path / 'classifier.pth'), '--keep-head'])
    assert f"load strictly into SecViTClassifier('{arch}')" in capsys.readouterr().out
    state = torch.load(tmp_path / 'classifier.pth')['state_dict']
    assert set(state) == set(SecViTClassifier(arch).state_dict())
    for key, value in official.state_dict().items():
        renamed = list(convert_official_state_dict({key: value}))
        if not renamed:  # the RoPE buffers, recomputed by our model
            assert key.endswith('RoPE.angle')
            continue
        new_key = renamed[0] if renamed[0].startswith('head.') else f'backbone.{renamed[0]}'
        assert torch.equal(state[new_key], value.reshape(state[new_key].shape)), key


def test_use_ema_converts_the_ema_weights(tmp_path, capsys):
    official_training_checkpoint(tmp_path / 'official.pth')
    convert_checkpoint.main([str(tmp_path / 'official.pth'), str(tmp_path / 'ema.pth'), '--use-ema'])
    assert '(EMA weights)' in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / 'official.pth')
    ema = torch.load(tmp_path / 'ema.pth')['state_dict']
    torch.testing.assert_close(ema['stages.1.blocks.0.attn.qkv.weight'],
                               checkpoint['model_ema']['layers.1.blocks.0.attn.qkv.weight'].flatten(1))


def test_unknown_objects_need_explicit_trust(tmp_path, capsys):
    official_training_checkpoint(tmp_path / 'official.pth', extra_state=TrainingState())
    argv = [str(tmp_path / 'official.pth'), str(tmp_path / 'out.pth')]
    with pytest.raises(SystemExit, match=r'(?s)Safe loading \(weights_only=True\) refused .*TrainingState.*'
                                         r'--trust-checkpoint'):
        convert_checkpoint.main(argv)
    assert not (tmp_path / 'out.pth').exists()
    convert_checkpoint.main(argv + ['--trust-checkpoint'])
    assert 'Wrote 319 tensors' in capsys.readouterr().out


def test_refuses_checkpoints_that_are_not_official(tmp_path):
    torch.save({'state_dict': SecViT('tiny').state_dict()}, tmp_path / 'ours.pth')
    with pytest.raises(SystemExit, match='not in the official SecViT layout'):
        convert_checkpoint.main([str(tmp_path / 'ours.pth'), str(tmp_path / 'out.pth')])
    torch.save({'model': official_model('tiny').state_dict()}, tmp_path / 'no_ema.pth')
    with pytest.raises(SystemExit, match='No EMA weights'):
        convert_checkpoint.main([str(tmp_path / 'no_ema.pth'), str(tmp_path / 'out.pth'), '--use-ema'])
