# UperNet with a compact SecViT backbone, trained from scratch on the synthetic scenes that
# tools/seg_demo.py generates (data/ade_demo/ADEChallengeData2016/, ADE20K layout). Sized to train on
# 2 CPU cores in minutes. Validation runs in 'whole' mode on the images' own sizes (112-176 px, mostly
# not multiples of 32).
_base_ = ['./_base_/upernet_secvit_ade20k_160k.py']

data_root = 'data/ade_demo/ADEChallengeData2016'
metainfo = dict(classes=('wall', 'building', 'sky', 'floor', 'tree'))  # ADE20K's first five classes
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)  # one process on the CPU: no SyncBN
max_iters = 600

# Four stages at strides 4-32 like every SecViT, with fewer and narrower blocks.
demo_arch = dict(_delete_=True, embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch=demo_arch, cluster_size=64, drop_path_rate=0.0),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=64, num_classes=5, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=5, norm_cfg=norm_cfg),
    test_cfg=dict(mode='whole'))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(176, 176), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.01), clip_grad=dict(max_norm=10.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=50, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=20, log_metric_by_epoch=False),
                     checkpoint=dict(by_epoch=False, interval=max_iters))
auto_scale_lr = dict(base_batch_size=8)
