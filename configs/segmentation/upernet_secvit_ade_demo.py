# CPU demo: UperNet + a small SecViT trained from scratch on the synthetic ADE20K-layout set that
# demo/make_dataset.py ade writes (5 classes, images of 112-176 px). Run it with demo/segmentation_demo.py.
_base_ = ['./upernet_secvit_t.py']

data_root = 'data/ade_demo/ADEChallengeData2016'
# The demo set's classes: ADE20K's first five, so the annotation files keep ADE20K's ids.
metainfo = dict(classes=('wall', 'building', 'sky', 'floor', 'tree'))
crop_size = (128, 128)
max_iters = 600
norm_cfg = dict(type='BN', requires_grad=True)  # one process on the CPU: no SyncBN

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(
        # Two blocks fewer than SecViT-T per stage and half its widths: 1.5M parameters.
        arch=dict(_delete_=True, embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
        drop_path_rate=0.0,
        init_cfg=None),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=64, num_classes=5, norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=5, norm_cfg=norm_cfg))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(144, 144), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
# Whole-image inference at the native size: the sides are mostly not multiples of 32.
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

optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=50, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
randomness = dict(seed=0)
