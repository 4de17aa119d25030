# Reproduces the Partial FC speed test of insightface arcface_torch (its
# README, "Speed Benchmark"):
# 3,000,000 synthetic identities, IResNet-50 (512-d), mixed precision,
# 128 images per GPU, Partial FC with sample rate 0.1.
# Reference on 8x V100-32GB: ~5300 samples/s, ~10.3-10.5 GB per GPU.
#   bash tools/dist_train.sh configs/pfc/r50_pfc0.1_3m.py 8
_base_ = [
    '../_base_/models/iresnet50_pfc.py',
    '../_base_/datasets/synthetic_face.py',
    '../_base_/schedules/sgd_poly.py',
    '../_base_/default_runtime.py',
]

model = dict(head=dict(num_classes=3000000, sample_rate=0.1))

# fp16 with dynamic loss scaling on GPUs (bf16 autocast without CUDA); the
# reference's GradScaler(growth_interval=100).
optim_wrapper = dict(
    type='PartialFCAmpOptimWrapper', loss_scale=dict(growth_interval=100))
