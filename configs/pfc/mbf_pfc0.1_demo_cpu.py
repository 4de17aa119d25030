# CPU demo of Partial FC training on 2 processes (2 to 3 minutes on
# 2 cores):
#   bash tools/dist_train.sh configs/pfc/mbf_pfc0.1_demo_cpu.py 2
# A reduced MobileFaceNet (width 64, one block per stage, 128-d) learns 1,000
# synthetic identities (a prototype image per identity plus noise) with
# ArcFace on a Partial FC head (sample rate 0.1: 50 of the 500 centers of a
# rank per step, positives included). The loss falls from ~40 to ~20.
_base_ = [
    '../_base_/models/mobilefacenet_pfc.py',
    '../_base_/datasets/synthetic_face.py',
    '../_base_/schedules/sgd_poly.py',
    '../_base_/default_runtime.py',
]

num_classes = 1000
max_iters = 80
warmup_iters = 5

model = dict(
    backbone=dict(scale=1, blocks=(1, 1, 1, 1), embedding_size=128),
    head=dict(num_classes=num_classes, in_channels=128, sample_rate=0.1))

train_dataloader = dict(
    batch_size=32,
    num_workers=0,  # generating a sample takes ~0.3 ms
    persistent_workers=False,
    pin_memory=False,
    dataset=dict(num_classes=num_classes, num_samples=100000,
                 learnable=True))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
         end=warmup_iters),
    dict(type='PolyLR', power=2.0, eta_min=0.0, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
train_cfg = dict(max_iters=max_iters)

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_iters))
custom_hooks = [
    dict(type='SpeedLogHook'),
    dict(type='MemoryTableHook', interval=max_iters),
]
env_cfg = dict(cudnn_benchmark=False)
