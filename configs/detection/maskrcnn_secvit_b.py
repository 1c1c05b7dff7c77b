# Mask R-CNN 1x with a SecViT-B backbone on COCO.
_base_ = ['./maskrcnn_secvit_s.py']

pretrained = 'checkpoints/secvit_b_in1k.pth'  # official ImageNet-1k SecViT-B checkpoint, see docs/detection.md
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.4, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 320, 512]))
