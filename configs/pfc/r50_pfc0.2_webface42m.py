# insightface arcface_torch `wf42m_pfc02_r50` on MMEngine: WebFace42M
# (2,059,906 identities, 42,474,557 images), IResNet-50, CosFace (s=64,
# m=0.4), Partial FC with sample rate 0.2, mixed precision, 128 per GPU on
# 8 GPUs, SGD lr 0.1 / wd 5e-4, 20 epochs with 2 epochs of linear warmup,
# polynomial decay; verification every 10000 iterations.
#   bash tools/dist_train.sh configs/pfc/r50_pfc0.2_webface42m.py 8
_base_ = [
    '../_base_/models/iresnet50_pfc.py',
    '../_base_/datasets/webface42m.py',
    '../_base_/schedules/sgd_poly.py',
    '../_base_/default_runtime.py',
]

max_iters = 20 * 42474557 // (8 * 128)  # 20 epochs at global batch 1024
warmup_iters = max_iters // 10  # 2 epochs

model = dict(
    head=dict(
        num_classes={{_base_.num_classes}},
        sample_rate=0.2,
        loss=dict(m2=0.0, m3=0.4)))
optim_wrapper = dict(
    type='PartialFCAmpOptimWrapper', loss_scale=dict(growth_interval=100))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
         end=warmup_iters),
    dict(type='PolyLR', power=2.0, eta_min=0.0, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=10000)
# Keep the checkpoint with the best mean of the LFW/CFP-FP/AgeDB accuracies.
default_hooks = dict(
    checkpoint=dict(interval=10000, save_best='mean_accuracy', rule='greater'))
