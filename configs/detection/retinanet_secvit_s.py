# RetinaNet 1x with a SecViT-S backbone on COCO. The FPN starts from stage 2 (stride 8) and adds two extra
# levels, so stage 1 is not returned (out_indices (1, 2, 3)) and has no unused parameters.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    './_base_/secvit_schedule_1x.py',
]

pretrained = 'checkpoints/secvit_s_in1k.pth'  # official ImageNet-1k SecViT-S checkpoint, see docs/detection.md
cluster_size = 98  # tokens per cluster in every stage, as in maskrcnn_secvit_s.py (why: see there)

model = dict(
    backbone=dict(
        _delete_=True,
        type='SecViT',
        arch='small',
        cluster_size=cluster_size,
        out_indices=(1, 2, 3),
        drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512], start_level=0, num_outs=5))

optim_wrapper = dict(optimizer=dict(weight_decay=1e-4))
