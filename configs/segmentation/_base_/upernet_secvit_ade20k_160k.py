# UperNet with a SecViT backbone on ADE20K: 160k iterations, 512x512 crops, 8 GPUs x 2 images.
# The variant configs (upernet_secvit_{t,s,b,l}.py) set arch, drop path, channels and the checkpoint.
_base_ = [
    'mmseg::_base_/models/upernet_swin.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', 'mmseg::_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['mmsecvit'], allow_failed_imports=False)

# 98 tokens per cluster in every stage: what stages 1-3 saw in ImageNet pre-training at 224 px
# (3136 / 32, 784 / 8, 196 / 2 tokens). A fixed cluster size (rather than a fixed cluster count) keeps
# attention cost linear in the number of pixels at 512x512 crops and at whole-image inference alike.
tokens_per_cluster = 98

crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        _delete_=True,
        type='SecViT',
        arch='small',
        cluster_size=tokens_per_cluster,
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.15,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False),
    decode_head=dict(in_channels=[64, 128, 256, 512], num_classes=150),
    auxiliary_head=dict(in_channels=256, num_classes=150))

# AdamW; no weight decay on what acts as a norm or a position encoding: every norm layer (LayerNorm in the
# blocks and outputs, BN in the stem, downsampling and heads), the conditional position conv `cpe`, the
# LePE conv `attn.lepe` (both play the role Swin's relative position tables do) and the layer scales
# `gamma1/gamma2` (per-channel gains like a norm's weight; decaying them would shrink residual branches).
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            '.cpe.': dict(decay_mult=0.),
            '.attn.lepe.': dict(decay_mult=0.),
            '.gamma': dict(decay_mult=0.),
        }))

# Linear warm-up for 1500 iterations, then poly decay (power 1.0) to zero.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=1500, end=160000),
]

# 8 GPUs x 2 images per GPU (16 in total).
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
auto_scale_lr = dict(enable=False, base_batch_size=16)
