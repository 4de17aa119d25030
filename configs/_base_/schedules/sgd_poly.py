# The reference's optimizer: SGD lr 0.1, momentum 0.9, weight decay 5e-4,
# gradient clipping at norm 5 on the replicated (backbone) parameters only;
# linear warmup, then polynomial (power 2) decay to 0, stepped every iteration.
# A config with another length overrides `train_cfg` and `param_scheduler`.
max_iters = 100000
warmup_iters = 1000

optim_wrapper = dict(
    type='PartialFCOptimWrapper',  # tools/train.py --amp: mixed precision
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4),
    clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0,
         end=warmup_iters),
    dict(type='PolyLR', power=2.0, eta_min=0.0, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters,
                 val_interval=2000)
