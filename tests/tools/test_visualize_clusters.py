import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmsecvit.models import SecViT

from helpers import TOOLS, load_tool, one_torch_thread
from official_reference import official_training_checkpoint

single_torch_thread = pytest.fixture(autouse=True)(one_torch_thread)


visualize_clusters = load_tool('analysis_tools/visualize_clusters')


@pytest.fixture
def image_path(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    path = tmp_path / 'image.jpg'
    Image.fromarray(pixels).save(path)
    return path


def test_cli_writes_a_png_and_says_the_weights_are_random(image_path, tmp_path):
    out = tmp_path / 'clusters.png'
    argv = [str(image_path), '--arch', 'tiny', '--cluster-size', '16', '--size', '64', '--stages', '1', '2',
            '--out', str(out)]
    result = subprocess.run([sys.executable, str(TOOLS / 'analysis_tools' / 'visualize_clusters.py'), *argv],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f'Wrote {out}'
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.width > 200 and png.height > 200
        png.verify()

    figure = visualize_clusters.make_figure(visualize_clusters.parse_args(argv))
    assert 'RANDOM weights' in figure._suptitle.get_text()
    assert len(figure.axes) == 2 * 3  # two stages x (input + two heads)


def test_hooks_capture_equal_sized_clusters_per_head():
    backbone = SecViT('tiny', cluster_size=16).eval()
    attentions = visualize_clusters.chosen_attentions(backbone, [1, 2], block=-1, heads=[0, 1])
    clusters = visualize_clusters.capture_clusters(backbone, torch.randn(1, 3, 64, 96), attentions, [0, 1])
    assert clusters[1].shape == (2, 16, 24) and clusters[2].shape == (2, 8, 12)
    for ids in clusters.values():
        for head_ids in ids:
            # SEC cuts the ranking into equal clusters: 384 tokens -> 24 x 16, 96 tokens -> 6 x 16.
            assert torch.bincount(head_ids.flatten()).tolist() == [16] * (head_ids.numel() // 16)
    assert not attentions[1]._forward_pre_hooks  # hooks removed


def test_config_and_official_checkpoint(image_path, tmp_path):
    official_training_checkpoint(tmp_path / 'official.pth')
    config = tmp_path / 'det_config.py'
    config.write_text("model = dict(type='MaskRCNN', backbone=dict(type='SecViT', arch='tiny', "
                      "num_clusters=(8, 4, 2, -1), init_cfg=dict(type='Pretrained', checkpoint='missing.pth')))\n")
    args = visualize_clusters.parse_args([str(image_path), '--config', str(config), '--size', '64', '--heads', '1',
                                         '--checkpoint', str(tmp_path / 'official.pth')])
    figure = visualize_clusters.make_figure(args)
    title = figure._suptitle.get_text()
    assert 'SecViT-tiny' in title and f'weights: {tmp_path / "official.pth"}' in title and 'RANDOM' not in title
    assert figure.axes[1].get_title() == 'head 1\n8 clusters of \u226444 tokens'  # 16 x 22 tokens in stage 1


def test_bad_choices_are_named(image_path, tmp_path):
    config = tmp_path / 'resnet.py'
    config.write_text("model = dict(backbone=dict(type='ResNet', depth=50))\n")
    with pytest.raises(SystemExit, match="model.backbone must be a SecViT, found type 'ResNet'"):
        visualize_clusters.make_figure(visualize_clusters.parse_args([str(image_path), '--config', str(config)]))
    with pytest.raises(SystemExit, match=r'--heads must be in 0\.\.1 for stage 1, got \[0, 2\]'):
        visualize_clusters.make_figure(visualize_clusters.parse_args(
            [str(image_path), '--arch', 'tiny', '--size', '64', '--heads', '0', '2']))
    with pytest.raises(SystemExit, match=r'--stages must be in 1\.\.4, got 5'):
        visualize_clusters.make_figure(visualize_clusters.parse_args(
            [str(image_path), '--arch', 'tiny', '--size', '64', '--stages', '5']))


def test_adjacent_clusters_get_distinct_colours():
    colours = visualize_clusters.distinct_colours(64)
    assert colours.shape == (64, 3) and colours.min() >= 0 and colours.max() <= 1
    assert len(np.unique(colours.round(3), axis=0)) == 64
    assert np.abs(np.diff(colours, axis=0)).sum(axis=1).min() > 0.3
