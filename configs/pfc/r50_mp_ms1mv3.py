# insightface arcface_torch `ms1mv3_r50` on MMEngine: MS1MV3 (93,431
# identities, 5,179,510 images), IResNet-50, ArcFace (s=64, m=0.5), all
# centers used (sample rate 1.0, model parallel), mixed precision, 128 per GPU
# on 8 GPUs, SGD lr 0.1 / wd 5e-4, 20 epochs without warmup, polynomial decay;
# LFW / CFP-FP / AgeDB-30 verification every 2000 iterations.
#   bash tools/dist_train.sh configs/pfc/r50_mp_ms1mv3.py 8
_base_ = [
    '../_base_/models/iresnet50_pfc.py',
    '../_base_/datasets/ms1mv3.py',
    '../_base_/schedules/sgd_poly.py',
    '../_base_/default_runtime.py',
]

max_iters = 20 * 5179510 // (8 * 128)  # 20 epochs at global batch 1024

model = dict(head=dict(num_classes={{_base_.num_classes}}, sample_rate=1.0))
optim_wrapper = dict(
    type='PartialFCAmpOptimWrapper', loss_scale=dict(growth_interval=100))
param_scheduler = [
    dict(type='PolyLR', power=2.0, eta_min=0.0, by_epoch=False, begin=0,
         end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=2000)
# Keep the checkpoint with the best mean of the LFW/CFP-FP/AgeDB accuracies.
default_hooks = dict(
    checkpoint=dict(interval=2000, save_best='mean_accuracy', rule='greater'))
