# Semantic FPN + SecViT-S on ADE20K, 80k iterations, 512x512 crops (8 GPUs x 2 images).
_base_ = [
    'mmseg::_base_/models/fpn_r50.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_80k.py'
]
custom_imports = dict(imports=['mmsecvit'], allow_failed_imports=False)

# 98 tokens per cluster in every stage, as in the UperNet configs: what stages 1-3 saw in ImageNet
# pre-training at 224 px (3136 / 32, 784 / 8, 196 / 2); cost stays linear in the number of pixels.
tokens_per_cluster = 98
pretrained = 'checkpoints/secvit_s_in1k.pth'  # official ImageNet-1k checkpoint

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='SecViT',
        arch='small',
        cluster_size=tokens_per_cluster,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.15,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 256, 512]),
    decode_head=dict(num_classes=150))

# AdamW, lr 1e-4, weight decay 1e-4 (none on norms, position convs and layer scales; see the UperNet base).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            '.cpe.': dict(decay_mult=0.),
            '.attn.lepe.': dict(decay_mult=0.),
            '.gamma': dict(decay_mult=0.),
        }))
param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, by_epoch=False, begin=0, end=80000)]

# 8 GPUs x 2 images per GPU (16 in total).
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
