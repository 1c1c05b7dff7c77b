# Mask R-CNN 3x with multi-scale + crop training and a SecViT-B backbone on COCO.
_base_ = ['./maskrcnn_secvit_s_3x.py']

pretrained = 'checkpoints/secvit_b_in1k.pth'  # official ImageNet-1k SecViT-B checkpoint, see docs/detection.md
model = dict(
    backbone=dict(arch='base', drop_path_rate=0.4, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[80, 160, 320, 512]))
