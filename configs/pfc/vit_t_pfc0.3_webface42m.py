# insightface arcface_torch `wf42m_pfc03_40epoch_8gpu_vit_t` on MMEngine:
# WebFace42M (2,059,906 identities), ViT-T, CosFace (s=64, m=0.4), Partial FC
# with sample rate 0.3, mixed precision, 384 per GPU on 8 GPUs, AdamW lr 1e-3
# / wd 0.1 (the sampled centers follow the same AdamW rule), 40 epochs with
# 4 epochs of linear warmup, polynomial decay; verification every 10000
# iterations.
#   bash tools/dist_train.sh configs/pfc/vit_t_pfc0.3_webface42m.py 8
_base_ = [
    '../_base_/models/vit_t_pfc.py',
    '../_base_/datasets/webface42m.py',
    '../_base_/schedules/sgd_poly.py',
    '../_base_/default_runtime.py',
]

batch_size = 384  # per GPU
max_iters = 40 * 42474557 // (8 * batch_size)  # 40 epochs
warmup_iters = max_iters // 10  # 4 epochs

model = dict(
    head=dict(
        num_classes={{_base_.num_classes}},
        sample_rate=0.3,
        loss=dict(m2=0.0, m3=0.4)))
train_dataloader = dict(batch_size=batch_size)
optim_wrapper = dict(
    type='PartialFCAmpOptimWrapper',
    loss_scale=dict(growth_interval=100),
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-3, weight_decay=0.1))
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
