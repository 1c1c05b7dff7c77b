import subprocess
import sys
import textwrap

import pytest

from mmsecvit import SecViT


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_every_variant_builds_from_registry(scope):
    registry = __import__(f'{scope}.registry', fromlist=['MODELS']).MODELS
    for arch, dims in [('tiny', 64), ('s', 64), ('base', 80), ('l', 112)]:
        model = registry.build(dict(type='SecViT', arch=arch, out_indices=(0, 1, 2, 3)))
        assert isinstance(model, SecViT) and model.out_channels[0] == dims


def test_custom_imports_from_a_config_outside_the_repository(tmp_path):
    # A fresh interpreter that never imports mmsecvit itself: the config's custom_imports must suffice.
    (tmp_path / 'my_cfg.py').write_text(textwrap.dedent('''
        custom_imports = dict(imports=['mmsecvit'], allow_failed_imports=False)
        backbone = dict(type='SecViT', arch='small', cluster_size=98, out_indices=(1, 2, 3))
    '''))
    script = textwrap.dedent('''
        import torch
        from mmengine.config import Config
        from mmengine.utils import import_modules_from_strings
        from mmdet.registry import MODELS as DET
        from mmseg.registry import MODELS as SEG
        cfg = Config.fromfile('my_cfg.py')
        import_modules_from_strings(**cfg.custom_imports)
        for registry in (DET, SEG):
            model = registry.build(cfg.backbone).eval()
            print(type(model).__module__, [tuple(o.shape) for o in model(torch.zeros(1, 3, 64, 64))])
    ''')
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines == ["mmsecvit.models.secvit [(1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]"] * 2
