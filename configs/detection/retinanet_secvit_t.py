# RetinaNet 1x with a SecViT-T backbone on COCO (FPN from stage 2, see retinanet_secvit_s.py).
_base_ = ['./retinanet_secvit_s.py']

pretrained = 'checkpoints/secvit_t_in1k.pth'  # official ImageNet-1k SecViT-T checkpoint, see docs/detection.md
model = dict(
    backbone=dict(arch='tiny', drop_path_rate=0.1, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[128, 256, 512]))
