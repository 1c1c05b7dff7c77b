# RetinaNet 1x with a SecViT-L backbone on COCO (FPN from stage 2, see retinanet_secvit_s.py).
_base_ = ['./retinanet_secvit_s.py']

pretrained = 'checkpoints/secvit_l_in1k.pth'  # official ImageNet-1k SecViT-L checkpoint, see docs/detection.md
model = dict(
    backbone=dict(arch='large', drop_path_rate=0.5, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[224, 448, 640]))
