# Mask R-CNN 1x with a SecViT-S backbone on COCO (data/coco/, see docs/detection.md).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    './_base_/secvit_schedule_1x.py',
]

pretrained = 'checkpoints/secvit_s_in1k.pth'  # official ImageNet-1k SecViT-S checkpoint, see docs/detection.md
# 98 tokens per cluster in every stage: what stages 1-3 saw in ImageNet pre-training at 224 px (3136/32,
# 784/8, 196/2). It keeps the cost linear in the number of pixels; the official fixed cluster counts
# (32, 8, 2, -1) would give 2100-token clusters at 800x1344.
cluster_size = 98

model = dict(
    backbone=dict(
        _delete_=True,
        type='SecViT',
        arch='small',
        cluster_size=cluster_size,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
