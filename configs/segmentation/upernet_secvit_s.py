# UperNet + SecViT-S on ADE20K, 160k iterations, 512x512 crops (8 GPUs x 2 images).
_base_ = ['./_base_/upernet_secvit_ade20k_160k.py']

pretrained = 'checkpoints/secvit_s_in1k.pth'  # official ImageNet-1k checkpoint
model = dict(
    backbone=dict(arch='small', drop_path_rate=0.15, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 256, 512]),
    auxiliary_head=dict(in_channels=256))
