# Mask R-CNN 1x with a SecViT-T backbone on COCO.
_base_ = ['./maskrcnn_secvit_s.py']

pretrained = 'checkpoints/secvit_t_in1k.pth'  # official ImageNet-1k SecViT-T checkpoint, see docs/detection.md
model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.1, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]))
