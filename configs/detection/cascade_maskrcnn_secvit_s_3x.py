# Cascade Mask R-CNN 3x with multi-scale + crop training and a SecViT-S backbone on COCO.
_base_ = [
    'mmdet::_base_/models/cascade-mask-rcnn_r50_fpn.py',
    './_base_/coco_instance_ms_crop.py',
    './_base_/secvit_schedule_3x.py',
]

pretrained = 'checkpoints/secvit_s_in1k.pth'  # official ImageNet-1k SecViT-S checkpoint, see docs/detection.md
cluster_size = 98  # tokens per cluster in every stage, as in maskrcnn_secvit_s.py (why: see there)

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
