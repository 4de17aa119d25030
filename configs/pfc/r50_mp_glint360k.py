# insightface arcface_torch `glint360k_r50` on MMEngine: Glint360K (360,232
# identities, 17,091,657 images), IResNet-50, CosFace (s=64, m=0.4), sample
# rate 1.0 (model parallel), mixed precision, 128 per GPU on 8 GPUs, SGD
# lr 0.1 / wd 1e-4, 20 epochs without warmup, polynomial decay; verification
# every 10000 iterations.
#   bash tools/dist_train.sh configs/pfc/r50_mp_glint360k.py 8
_base_ = [
    '../_base_/models/iresnet50_pfc.py',
    '../_base_/datasets/glint360k.py',
    '../_base_/schedules/sgd_poly.py',
    '../_base_/default_runtime.py',
]

max_iters = 20 * 17091657 // (8 * 128)  # 20 epochs at global batch 1024

model = dict(
    head=dict(
        num_classes={{_base_.num_classes}},
        sample_rate=1.0,
        loss=dict(m2=0.0, m3=0.4)))
optim_wrapper = dict(
    type='PartialFCAmpOptimWrapper',
    loss_scale=dict(growth_interval=100),
    optimizer=dict(weight_decay=1e-4))
param_scheduler = [
    dict(type='PolyLR', power=2.0, eta_min=0.0, by_epoch=False, begin=0,
         end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=10000)
# Keep the checkpoint with the best mean of the LFW/CFP-FP/AgeDB accuracies.
default_hooks = dict(
    checkpoint=dict(interval=10000, save_best='mean_accuracy', rule='greater'))
