"""A small synthetic segmentation set in the real ADE20K layout.

Every image is an outdoor-like scene: sky above a horizon, floor below it, buildings standing on the
horizon, walls in front of them, trees, and a few clutter blobs. Each class has its own colour family and
texture, jittered per image, so a small network can learn it in minutes on a CPU.

Annotations use the ADE20K ids of these classes (``wall`` 1, ``building`` 2, ``sky`` 3, ``floor`` 4,
``tree`` 5) and 0 for the clutter, which ``reduce_zero_label`` turns into the ignore index 255. mmseg's
``ADE20KDataset`` reads the set unmodified with ``metainfo=dict(classes=DEMO_CLASSES)``; its label map then
sends ids 1-5 to 0-4.
"""
import os
import os.path as osp

import numpy as np
from PIL import Image

# ADE20K's first five classes, in ADE20K order (their ids in the annotation files are 1-5).
DEMO_CLASSES = ('wall', 'building', 'sky', 'floor', 'tree')
WALL, BUILDING, SKY, FLOOR, TREE = range(1, 6)
IGNORE = 0
SPLITS = {'training': 0, 'validation': 1}


def _jitter(rng, rgb, amount=20):
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _paint(image, labels, mask, label, colour, texture):
    image[mask] = colour + texture[mask][:, None]
    labels[mask] = label


def _scene(rng, height, width):
    """One image (H, W, 3) uint8 and its ADE20K-id annotation (H, W) uint8."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    labels = np.zeros((height, width), np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.55))

    # Sky: smooth blue gradient. Floor: brown planks (horizontal stripes).
    sky = ys < horizon
    _paint(image, labels, sky, SKY, _jitter(rng, (110, 170, 235)), -40 * ys / height)
    plank = rng.uniform(5, 9)
    _paint(image, labels, ~sky, FLOOR, _jitter(rng, (130, 95, 60)), 18 * np.sign(np.sin(ys / plank * np.pi)))

    # Buildings: grey blocks on the horizon with a grid of dark windows.
    for _ in range(rng.integers(1, 4)):
        w = rng.uniform(0.15, 0.35) * width
        x0 = rng.uniform(-0.1 * width, width - 0.5 * w)
        top = horizon - rng.uniform(0.2, 0.8) * horizon
        block = (xs >= x0) & (xs < x0 + w) & (ys >= top) & (ys < horizon + 0.05 * height)
        windows = ((xs - x0) % 8 < 4) & ((ys - top) % 10 < 5)
        _paint(image, labels, block, BUILDING, _jitter(rng, (150, 150, 155)), -70 * windows)

    # Walls: red-brown bricks (staggered rows) standing on the floor.
    for _ in range(rng.integers(0, 3)):
        w, h = rng.uniform(0.2, 0.4) * width, rng.uniform(0.15, 0.3) * height
        x0, bottom = rng.uniform(0, width - w), rng.uniform(horizon + 0.1 * height, height)
        block = (xs >= x0) & (xs < x0 + w) & (ys >= bottom - h) & (ys < bottom)
        row = (ys // 5) % 2
        mortar = ((ys % 5) < 1) | (((xs + 5 * row) % 10) < 1)
        _paint(image, labels, block, WALL, _jitter(rng, (170, 80, 60)), 60 * mortar)

    # Trees: green ellipses with leafy noise.
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, width), rng.uniform(0.2 * height, 0.9 * height)
        rx, ry = rng.uniform(0.06, 0.14) * width, rng.uniform(0.1, 0.2) * height
        crown = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        _paint(image, labels, crown, TREE, _jitter(rng, (50, 120, 45)), rng.normal(0, 25, (height, width)))

    # Clutter (ignored): a few discs of any colour.
    for _ in range(rng.integers(0, 3)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.03, 0.08) * width
        disc = (xs - cx) ** 2 + (ys - cy) ** 2 < r ** 2
        _paint(image, labels, disc, IGNORE, rng.uniform(0, 255, 3), np.zeros((height, width), np.float32))

    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def make_ade_demo(data_root, num_train=160, num_val=40, seed=0, min_size=112, max_size=176):
    """Write the demo set under ``data_root`` (e.g. ``data/ade_demo/ADEChallengeData2016``).

    Files: ``images/{training,validation}/demo_<split>_<i>.jpg`` and the annotations of the same name
    in ``annotations/{training,validation}/*.png``. The same arguments always give the same files.

    Args:
        data_root (str): Root of the set, like ADE20K's ``ADEChallengeData2016``.
        num_train (int): Training images.
        num_val (int): Validation images.
        seed (int): Seed of every random choice.
        min_size (int): Smallest image side; sides are drawn uniformly from [min_size, max_size], so most are
            not multiples of 32.
        max_size (int): Largest image side.

    Returns:
        dict: Number of images written per split.
    """
    if not 32 <= min_size <= max_size:
        raise ValueError(f'Need 32 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}')
    counts = {'training': num_train, 'validation': num_val}
    for split, count in counts.items():
        image_dir = osp.join(data_root, 'images', split)
        ann_dir = osp.join(data_root, 'annotations', split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for index in range(count):
            rng = np.random.default_rng([seed, SPLITS[split], index])
            height, width = rng.integers(min_size, max_size + 1, 2)
            image, labels = _scene(rng, int(height), int(width))
            name = f'demo_{split}_{index:04d}'
            Image.fromarray(image).save(osp.join(image_dir, name + '.jpg'), quality=95)
            Image.fromarray(labels).save(osp.join(ann_dir, name + '.png'))
    return counts
