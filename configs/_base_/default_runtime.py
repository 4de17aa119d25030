# Runtime shared by every mmpfc config: the Partial FC runner and DDP wrapper
# (shard rows stay rank-local: not broadcast, not all-reduced), iteration-based
# logging with the reference's speed line and a per-rank memory table.
default_scope = 'mmpfc'
runner_type = 'PartialFCRunner'
model_wrapper_cfg = dict(
    type='PartialFCDistributedDataParallel',
    broadcast_buffers=False,
    find_unused_parameters=False)

default_hooks = dict(
    runtime_info=dict(type='RuntimeInfoHook'),
    timer=dict(type='IterTimerHook'),
    # iteration-based: validation metrics are logged at their iteration
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # Every rank saves its shard (PartialFCRunner's save_checkpoint).
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=10000,
        max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    # On SIGTERM / SIGUSR1 (preemption, a time limit ahead) every rank
    # finishes its iteration, the ranks save that iteration together and the
    # run exits with status 75: resume it with --resume. (A default hook, so
    # a config that replaces custom_hooks keeps it.)
    preemption=dict(type='PreemptionHook'),
)
# `Training: Speed ... samples/sec   Loss ...` every LoggerHook interval, and
# a `gpustat -i`-like table of every rank's memory (device memory on GPUs,
# process RSS on the CPU).
# A non-finite loss or weight stops every rank before a checkpoint of it is
# written (action='warn' logs and goes on while the weights are finite).
custom_hooks = [
    dict(type='SpeedLogHook'),
    dict(type='MemoryTableHook', interval=2000),
    dict(type='TrainingHealthHook', patience=1, action='stop',
         min_loss_scale=1e-4),
]

env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # No backend: NCCL when CUDA is available, gloo otherwise. Ranks started
    # without torchrun give up after start_timeout s if one is missing.
    dist_cfg=dict(start_timeout=300))

log_processor = dict(type='LogProcessor', window_size=50, by_epoch=False)
log_level = 'INFO'
# Add dict(type='TensorboardVisBackend') for TensorBoard (installed with the
# requirements; it gets the same scalars as the JSON log).
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='Visualizer', vis_backends=vis_backends)

load_from = None
resume = False
# A fresh run refuses a work dir that holds checkpoints; True replaces them.
overwrite = False
randomness = dict(seed=2048)  # the reference's seed
