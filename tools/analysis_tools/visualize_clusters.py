"""Draw which image regions SEC attention puts in the same cluster.

In every SecViT attention layer, each head ranks all tokens by the cosine similarity of their key to the
mean key and cuts the ranking into equal clusters. For each chosen stage this tool takes one block's
attention (by default the stage's last), colours each chosen head's clusters (one colour per cluster)
over a faded copy of the image, and draws them beside the input.

Examples::

    python tools/analysis_tools/visualize_clusters.py photo.jpg --arch small --checkpoint secvit_s_in1k.pth
    python tools/analysis_tools/visualize_clusters.py photo.jpg --config my_mask_rcnn_secvit.py \\
        --checkpoint work_dirs/my_mask_rcnn_secvit/epoch_12.pth --stages 1 2 --heads 0 1 2 --out clusters.png

``--checkpoint`` takes an official SecViT checkpoint, a converted one, or a detector/segmentor checkpoint
(``backbone.`` prefix). Without it the backbone's ``init_cfg`` pretrained weights are used if a config
sets them; otherwise the weights are random, and the figure says so.
"""
import argparse
import math

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from mmengine.config import Config
from mmengine.registry import MODELS
from PIL import Image

from mmsecvit.models import SecViT, load_backbone_checkpoint
from mmsecvit.models.secvit import ARCH_SETTINGS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GOLDEN_RATIO = (math.sqrt(5) - 1) / 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('image', help='input image')
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument('--config', help='mmdet/mmseg config whose model.backbone is a SecViT')
    model.add_argument('--arch', choices=sorted(ARCH_SETTINGS), help='build SecViT(arch) directly')
    parser.add_argument('--cluster-size', type=int,
                        help='with --arch: tokens per cluster (default: the official 32, 8, 2, 1 clusters per stage)')
    parser.add_argument('--checkpoint', help='official, converted or detector/segmentor checkpoint')
    parser.add_argument('--stages', type=int, nargs='+', default=[1, 2, 3], help='stages to show, from 1')
    parser.add_argument('--block', type=int, default=-1, help='block of each stage to show (default: the last)')
    parser.add_argument('--heads', type=int, nargs='+', default=[0, 1], help='attention heads to show, from 0')
    parser.add_argument('--size', type=int, default=224, help='shorter image side fed to the network')
    parser.add_argument('--alpha', type=float, default=0.7, help='opacity of the cluster colours')
    parser.add_argument('--out', default='clusters.png', help='output PNG')
    parser.add_argument('--dpi', type=int, default=100, help='resolution of the PNG')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random initialisation')
    args = parser.parse_args(argv)
    if args.cluster_size is not None and args.config:
        parser.error('--cluster-size goes with --arch; a config sets the clusters in model.backbone')
    return args


def load_image(path, short_side):
    """RGB image as a uint8 (H, W, 3) array, resized so that its shorter side is ``short_side``."""
    image = Image.open(path).convert('RGB')
    scale = short_side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.array(image.resize(size, Image.BICUBIC))


def to_input(image):
    """ImageNet-normalised (1, 3, H, W) float tensor of a uint8 (H, W, 3) RGB image."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((x - mean) / std).unsqueeze(0)


def build_backbone(config=None, arch=None, cluster_size=None):
    """SecViT from a config's ``model.backbone`` or from an arch name.

    Returns:
        tuple[SecViT, str]: The backbone and a label for it.
    """
    if config is None:
        return SecViT(arch, cluster_size=cluster_size), f'SecViT-{arch}'
    backbone_cfg = Config.fromfile(config).get('model', {}).get('backbone') or {}
    if str(backbone_cfg.get('type')).split('.')[-1] != 'SecViT':
        raise SystemExit(f"{config}: model.backbone must be a SecViT, found type {backbone_cfg.get('type')!r}")
    arch = backbone_cfg.get('arch', 'small')
    return MODELS.build(backbone_cfg), f'SecViT-{arch}' if isinstance(arch, str) else 'SecViT'


def load_weights(backbone, checkpoint=None):
    """Load ``checkpoint``, else the backbone's ``init_cfg`` weights, else initialise randomly.

    Returns:
        str | None: Where the weights came from; None for random weights.
    """
    if checkpoint:
        load_backbone_checkpoint(backbone, checkpoint)
        return checkpoint
    backbone.init_weights()
    init_cfg = backbone.init_cfg or {}
    return init_cfg.get('checkpoint') if init_cfg.get('type') == 'Pretrained' else None


def chosen_attentions(backbone, stages, block, heads):
    """The attention module of the chosen block in each chosen (1-based) stage, checking every index.

    Raises:
        SystemExit: naming the index that is out of range.
    """
    attentions = {}
    for stage in stages:
        if not 1 <= stage <= len(backbone.stages):
            raise SystemExit(f'--stages must be in 1..{len(backbone.stages)}, got {stage}')
        blocks = backbone.stages[stage - 1].blocks
        if not -len(blocks) <= block < len(blocks):
            raise SystemExit(f'--block {block} does not exist in stage {stage}, which has {len(blocks)} blocks')
        attention = blocks[block].attn
        if max(heads) >= attention.num_heads or min(heads) < 0:
            raise SystemExit(f'--heads must be in 0..{attention.num_heads - 1} for stage {stage}, got {heads}')
        attentions[stage] = attention
    return attentions


@torch.no_grad()
def capture_clusters(backbone, x, attentions, heads):
    """Run the backbone once and record the cluster index of every position in the given attentions.

    Args:
        backbone (SecViT): The model, in eval mode.
        x (Tensor): One (1, 3, H, W) input.
        attentions (dict[int, SECAttention]): Attention module per stage.
        heads (Sequence[int]): Heads to keep.

    Returns:
        dict[int, Tensor]: Per stage, the (len(heads), h, w) cluster indices.
    """
    clusters = {}

    def record(stage):
        def hook(attention, inputs):  # inputs: (x, rope, norm) as the block passes them
            clusters[stage] = attention.cluster_ids(*inputs)[0, list(heads)]
        return hook

    handles = [attention.register_forward_pre_hook(record(stage)) for stage, attention in attentions.items()]
    try:
        backbone(x)
    finally:
        for handle in handles:
            handle.remove()
    return clusters


def distinct_colours(num_colours):
    """``num_colours`` RGB colours in [0, 1], (n, 3): hues a golden-ratio step apart, alternating brightness."""
    index = np.arange(num_colours)
    hsv = np.stack([(index * GOLDEN_RATIO) % 1, 0.55 + 0.45 * (index % 2), 1.0 - 0.3 * (index // 2 % 2)], -1)
    return hsv_to_rgb(hsv)


def overlay(image, cluster_ids, alpha):
    """Blend one colour per cluster over the image.

    Args:
        image (ndarray): uint8 (H, W, 3) image.
        cluster_ids (ndarray): (h, w) cluster index per token, h = ceil(H / stride).
        alpha (float): Opacity of the colours.

    Returns:
        ndarray: float (H, W, 3) in [0, 1].
    """
    height, width = image.shape[:2]
    stride = math.ceil(height / cluster_ids.shape[0])
    colours = distinct_colours(int(cluster_ids.max()) + 1)[cluster_ids]
    colours = colours.repeat(stride, axis=0).repeat(stride, axis=1)[:height, :width]
    return alpha * colours + (1 - alpha) * image / 255.0


def draw_figure(image, clusters, attentions, heads, title, alpha):
    """Grid with one row per stage: the input, then the clusters of each head."""
    rows, cols = len(clusters), 1 + len(heads)
    cell = 2.4
    aspect = image.shape[1] / image.shape[0]
    fig = Figure(figsize=(cell * aspect * cols, (cell + 0.4) * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    for row, (stage, ids) in enumerate(clusters.items()):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title('input', fontsize=8)
        axes[row, 0].set_ylabel(f'stage {stage}', fontsize=9)
        num_tokens = ids.shape[1] * ids.shape[2]
        for col, head in enumerate(heads, start=1):
            head_ids = ids[col - 1].cpu().numpy()
            axes[row, col].imshow(overlay(image, head_ids, alpha))
            axes[row, col].set_title(f'head {head}\n{int(head_ids.max()) + 1} clusters of '
                                     f'\u2264{attentions[stage].cluster_length(num_tokens)} tokens', fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def make_figure(args):
    """Build the model, run it on the image and draw the clusters; returns the matplotlib Figure."""
    torch.manual_seed(args.seed)
    backbone, label = build_backbone(args.config, args.arch, args.cluster_size)
    weights = load_weights(backbone, args.checkpoint)
    backbone.eval()
    attentions = chosen_attentions(backbone, args.stages, args.block, args.heads)
    image = load_image(args.image, args.size)
    clusters = capture_clusters(backbone, to_input(image), attentions, args.heads)
    block = 'last block' if args.block == -1 else f'block {args.block}'
    if weights is None:
        title = f'{label} SEC clusters, {block} of each stage\nRANDOM weights (no checkpoint given)'
    else:
        title = f'{label} SEC clusters, {block} of each stage\nweights: {weights}'
    return draw_figure(image, clusters, attentions, args.heads, title, args.alpha)


def main(argv=None):
    args = parse_args(argv)
    figure = make_figure(args)
    figure.savefig(args.out, dpi=args.dpi)
    print(f'Wrote {args.out}')


if __name__ == '__main__':
    main()
