# UperNet + SecViT-L on ADE20K, 160k iterations, 512x512 crops (8 GPUs x 2 images).
_base_ = ['./_base_/upernet_secvit_ade20k_160k.py']

pretrained = 'checkpoints/secvit_l_in1k.pth'  # official ImageNet-1k checkpoint
model = dict(
    backbone=dict(arch='large', drop_path_rate=0.5, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[112, 224, 448, 640]),
    auxiliary_head=dict(in_channels=448))
