"""One full training step of the real configs, as ranks 0 and 7 of 8 GPUs,
on this CPU-only machine (virtual GPU ranks, fp16 AMP, 128 images per GPU).

Each step must show: no device mismatch (the step runs), no host-device
synchronization in forward and backward and exactly the documented one in
the optimizer step, the collectives docs/partial_fc.md lists with their
byte counts (computed here from the sizes), the head's arithmetic in fp32
under fp16 autocast, and the live CUDA bytes after forward and after the
step equal to the memory model's within 5 %.
"""
import functools
import os

import pytest
import torch
from mmengine.config import Config

from mmpfc.benchmark.gpu_memory import (live_after_forward, live_between_steps,
                                        model_figures)
from mmpfc.benchmark.memory_model import predict_memory
from mmpfc.testing.virtual_step import run_virtual_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
WORLD, BATCH, DIM = 8, 128, 512
N = WORLD * BATCH
COMPACT = {'model.head.center_dtype': 'bfloat16',
           'optim_wrapper.center_state_dtype': 'int8'}
#: name -> (config, options, optimizer, fp32 states per backbone parameter,
#: bytes per embedding element under fp16 autocast)
CASES = {
    # insightface's IResNet computes its last FC in fp32
    'r50 PFC0.1 3M': ('configs/pfc/r50_pfc0.1_3m.py', {}, 'sgd', 1, 4),
    'r50 MP 3M': ('configs/pfc/r50_mp_3m.py', {}, 'sgd', 1, 4),
    'r50 PFC0.1 3M bf16/int8': ('configs/pfc/r50_pfc0.1_3m.py', COMPACT,
                                'sgd', 1, 4),
    # mmpretrain's LinearNeck runs in fp16 under autocast; AdamW
    'ViT-T PFC0.3': ('configs/pfc/vit_t_pfc0.3_webface42m.py', {}, 'adam',
                     2, 2),
}
RANKS = (0, WORLD - 1)


def config(name):
    path, options = CASES[name][:2]
    cfg = Config.fromfile(os.path.join(ROOT, path))
    cfg.merge_from_dict(options)
    return cfg


@functools.lru_cache(maxsize=None)
def step(name, rank):
    return run_virtual_step(config(name), rank, WORLD, BATCH)


@functools.lru_cache(maxsize=None)
def figures(name):
    return model_figures(config(name).model)


PARAMS = [(name, rank) for name in CASES for rank in RANKS]


@pytest.mark.parametrize('name,rank', PARAMS)
def test_no_host_read_but_the_documented_one(name, rank):
    gpu = step(name, rank).gpu
    assert gpu.host_reads_in('forward') == []
    assert gpu.host_reads_in('backward') == []
    reads = gpu.host_reads_in('step')
    # the loss-scaled step's one read: overflow flag, scale, clipped norm
    assert [(r.site.split(':')[0], r.values) for r in reads] == [
        ('mmpfc/engine/optimizers/partial_fc_optim_wrapper.py', 3)]


@pytest.mark.parametrize('name,rank', PARAMS)
def test_collectives_are_the_documented_ones(name, rank):
    gpu = step(name, rank).gpu
    emb = CASES[name][4]
    sent = {phase: [(c.kind, c.nbytes) for c in gpu.collectives_in(phase)]
            for phase in ('forward', 'backward', 'step')}
    assert sent == {
        # embeddings and labels of this rank; target logits, row maxima
        # and exp sums of the global batch
        'forward': [('all_gather', BATCH * DIM * emb),
                    ('all_gather', BATCH * 8)] + [('all_reduce', N * 4)] * 3,
        # the gradient of the global batch's embeddings, scattered
        'backward': [('reduce_scatter', N * DIM * emb)],
        # the overflow flag of the loss scaler
        'step': [('all_reduce', 4)]}


@pytest.mark.parametrize('name,rank', PARAMS)
def test_head_arithmetic_is_fp32_under_fp16_autocast(name, rank):
    kernels = step(name, rank).gpu.kernels
    head = [k for k in kernels if k.site.startswith('mmpfc/models/heads/')
            and k.phase in ('forward', 'backward')]
    assert {k.phase for k in head} == {'forward', 'backward'}
    assert {k.dtype for k in head} == {torch.float32}
    # and the backbone did run in fp16
    backbone = [k for k in kernels if k.phase == 'forward'
                and not k.site.startswith('mmpfc/models/heads/')]
    assert torch.float16 in {k.dtype for k in backbone}


@pytest.mark.parametrize('name,rank', PARAMS)
def test_live_bytes_match_the_memory_model(name, rank):
    cfg = config(name)
    head = cfg.model.head
    optimizer, states = CASES[name][2:4]
    fig = figures(name)
    estimate = predict_memory(
        method='pfc', num_classes=head.num_classes, world_size=WORLD,
        batch_size=BATCH, sample_rate=head.sample_rate,
        center_dtype=head.get('center_dtype', 'float32'),
        state_dtype=cfg.optim_wrapper.get('center_state_dtype', 'float32'),
        optimizer=optimizer, backbone_params=fig.params,
        largest_param=fig.largest_param,
        activation_bytes=fig.activations.per_sample,
        activation_fixed=fig.activations.fixed, backbone_states=states,
        input_bytes=4 * 3 * 112 * 112)
    gpu = step(name, rank).gpu
    between = live_between_steps(estimate, fig, states)
    forward = live_after_forward(estimate, fig, WORLD, BATCH, DIM, states)
    assert gpu.live_after['step'] == pytest.approx(between, rel=0.05)
    assert gpu.live_after['forward'] == pytest.approx(forward, rel=0.05)


def test_the_activations_are_cuda_fp16_ones():
    """IResNet-50 keeps about 34 MiB per image under CUDA fp16 autocast
    (63 MiB under the CPU's bf16 autocast, which keeps fp32 in places)."""
    per_sample = figures('r50 PFC0.1 3M').activations.per_sample / 2**20
    assert 30 < per_sample < 38
