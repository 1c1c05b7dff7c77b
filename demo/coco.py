"""A small synthetic instance-segmentation set in the real COCO layout, deterministic from a seed.

Each image shows a few filled shapes (one class per shape, each class with its own hue) on a smooth,
noisy background. Shapes never overlap, so every instance's polygon is exactly the region drawn for it.
The result is what mmdet's ``CocoDataset`` and ``CocoMetric`` read, unmodified::

    <root>/annotations/instances_train2017.json
    <root>/annotations/instances_val2017.json
    <root>/train2017/000000000001.png ...
    <root>/val2017/000000000001.png ...
"""
import json
import math
import os
import os.path as osp

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle')
# Base colour (BGR) of each class; every instance jitters it a little.
CLASS_COLORS = {'circle': (40, 40, 220), 'square': (40, 200, 40), 'triangle': (220, 60, 30)}
SPLITS = ('train', 'val')


def ann_file(split):
    """Annotation path of a split, relative to the data root (mmdet's COCO names)."""
    return f'annotations/instances_{split}2017.json'


def image_dir(split):
    return f'{split}2017/'


def shape_polygon(name, cx, cy, size, angle):
    """Vertices (N, 2) of a shape centred at (cx, cy) whose bounding circle has diameter ``size``."""
    num_vertices = {'circle': 32, 'square': 4, 'triangle': 3}[name]
    radius = size / 2
    thetas = angle + np.arange(num_vertices) * 2 * math.pi / num_vertices
    return np.stack([cx + radius * np.cos(thetas), cy + radius * np.sin(thetas)], axis=1)


def random_background(rng, height, width):
    """Smooth random gradient in muted colours plus pixel noise, uint8 (H, W, 3)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    corner_colors = rng.uniform(70, 180, size=(2, 2, 3))
    wy, wx = (ys / height)[..., None], (xs / width)[..., None]
    image = ((1 - wy) * ((1 - wx) * corner_colors[0, 0] + wx * corner_colors[0, 1])
             + wy * ((1 - wx) * corner_colors[1, 0] + wx * corner_colors[1, 1]))
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def overlaps(box, boxes, margin=2):
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin
               for b in boxes)


def draw_image(rng, height, width, max_objects, min_size, max_size):
    """One image and its instances as (class index, polygon) pairs."""
    image = random_background(rng, height, width)
    instances, boxes = [], []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(20):
            label = rng.randint(len(CLASSES))
            size = rng.uniform(min_size, max_size)
            cx, cy = rng.uniform(size / 2, width - size / 2), rng.uniform(size / 2, height - size / 2)
            polygon = shape_polygon(CLASSES[label], cx, cy, size, rng.uniform(0, 2 * math.pi))
            box = (*polygon.min(0), *polygon.max(0))
            if not overlaps(box, boxes):
                break
        else:
            continue
        color = np.clip(np.array(CLASS_COLORS[CLASSES[label]]) + rng.randint(-30, 31, size=3), 0, 255)
        cv2.fillPoly(image, [np.round(polygon * 16).astype(np.int32)], tuple(int(c) for c in color),
                     lineType=cv2.LINE_8, shift=4)
        instances.append((label, polygon))
        boxes.append(box)
    return image, instances


def polygon_annotation(polygon, height, width):
    """COCO bbox, area and segmentation of a polygon, with the area as pycocotools measures it."""
    from pycocotools import mask as mask_utils
    flat = polygon.round(2).reshape(-1).tolist()
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
    x0, y0 = polygon.min(0)
    x1, y1 = polygon.max(0)
    return dict(segmentation=[flat], area=float(mask_utils.area(rle)),
                bbox=[round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                iscrowd=0)


def make_split(root, split, num_images, rng, image_size, max_objects, object_size):
    height, width = image_size
    os.makedirs(osp.join(root, image_dir(split)), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, instances = draw_image(rng, height, width, max_objects, *object_size)
        file_name = f'{image_id:012d}.png'
        cv2.imwrite(osp.join(root, image_dir(split), file_name), image)
        images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
        for label, polygon in instances:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                                    **polygon_annotation(polygon, height, width)))
    coco = dict(info=dict(description=f'mmsecvit synthetic shapes, {split} split'),
                images=images, annotations=annotations,
                categories=[dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)])
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    with open(osp.join(root, ann_file(split)), 'w') as f:
        json.dump(coco, f)
    return len(annotations)


def make_coco_demo(root, num_train=300, num_val=60, image_size=(128, 128), max_objects=4,
                   object_size=(20, 56), seed=0):
    """Write the synthetic set under ``root`` in the COCO layout and return instance counts per split.

    Args:
        root (str): Output directory (the ``data_root`` of the configs).
        num_train (int): Training images.
        num_val (int): Validation images.
        image_size (tuple[int, int]): Height and width of every image.
        max_objects (int): Up to this many shapes per image (at least one).
        object_size (tuple[float, float]): Range of a shape's bounding-circle diameter in pixels.
        seed (int): Same seed, same files.
    """
    if min(image_size) <= object_size[1]:
        raise ValueError(f'image_size {image_size} must exceed the largest object size {object_size[1]}')
    rng = np.random.RandomState(seed)
    return {split: make_split(root, split, count, rng, image_size, max_objects, object_size)
            for split, count in zip(SPLITS, (num_train, num_val))}


def demo_exists(root):
    """True when both splits' annotation files are in place under ``root``."""
    return all(osp.isfile(osp.join(root, ann_file(split))) for split in SPLITS)
