# 1x schedule for SecViT detectors: AdamW, 12 epochs, lr steps after epochs 8 and 11, linear warm-up,
# 16 images per iteration (2 per GPU on 8 GPUs), as in mmdet's Swin configs and the paper family.
_base_ = ['mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py']

custom_imports = dict(imports=['mmsecvit'], allow_failed_imports=False)

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1),
]

# No weight decay on normalisation layers (norm_decay_mult: every LayerNorm/BatchNorm/GroupNorm, in the
# backbone and the heads) nor on the position parameters: the conditional position convs 'cpe', the LePE convs
# 'attn.lepe'
# (both depthwise, the counterpart of Swin's position bias tables) and the layer scales 'gamma1'/'gamma2'
# (per-channel gains that decay would pull to 0, i.e. switch the branch off).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        custom_keys={
            '.cpe.': dict(decay_mult=0.0),
            'attn.lepe': dict(decay_mult=0.0),
            'gamma1': dict(decay_mult=0.0),
            'gamma2': dict(decay_mult=0.0),
        }))

# Total batch the learning rate above is meant for; `tools/train.py --auto-scale-lr` rescales it.
auto_scale_lr = dict(enable=False, base_batch_size=16)
