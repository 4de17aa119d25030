# The data-parallel baseline of the insightface arcface_torch speed tables
# (its README, "Speed Benchmark"): every
# GPU holds all class centers (MarginSoftmaxHead, replicated) and DDP
# all-reduces their gradients. At 3M identities it does not fit a 32 GB GPU
# (the reference stops at 1.4M: 32 GB); to compare at 125K-1.4M identities
# lower model.head.num_classes and train_dataloader.dataset.num_classes
# together.
_base_ = ['./r50_pfc0.1_3m.py']

model = dict(
    head=dict(
        _delete_=True,
        type='MarginSoftmaxHead',
        num_classes=3000000,
        in_channels=512,
        loss=dict(type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5,
                  m3=0.0)))
