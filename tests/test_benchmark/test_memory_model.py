"""The per-rank memory model of mmpfc.benchmark.

The formula is pinned on the issue-5 set-up (1M identities, 2 ranks, D=512,
128 per rank) so that a change to it is deliberate, and checked against the
peak a real head-only step measures on one process (sizes where the
centers, not the runtime, dominate).
"""
import pytest
import torch
import torch.nn as nn
from dist_utils import run_in_fresh_process

from mmpfc.benchmark.memory_model import (RUNTIME_SLACK, MemoryEstimate,
                                          activation_bytes_per_sample,
                                          head_memory, predict_memory,
                                          sampled_rows, shard_rows)

SETUP = dict(num_classes=1_000_000, world_size=2, embedding_size=512,
             batch_size=128)
SHARD = 500_000 * 512 * 4  # fp32 centers of one rank


def test_partial_fc_parts():
    parts = head_memory('pfc', sample_rate=0.1, **SETUP)
    assert parts == dict(centers=SHARD, momentum=SHARD,
                         logits_and_grad=50_000 * 512 * 4,
                         embeddings=4 * 256 * 512 * 4,
                         sampling=500_000 * 4 + 12 * 50_000)
    peak = predict_memory('pfc', sample_rate=0.1, **SETUP).peak
    assert peak == sum(parts.values()) + RUNTIME_SLACK
    assert 2.0 < peak / SHARD < 2.2


def test_model_parallel_parts():
    parts = head_memory('pfc', sample_rate=1.0, **SETUP)
    # the logits buffer (N=256 < D=512) becomes the (Cl, D) gradient
    assert parts['logits_and_grad'] == SHARD
    assert parts['weight_decay_temp'] == SHARD
    assert 'sampling' not in parts
    no_wd = head_memory('pfc', sample_rate=1.0, weight_decay=False, **SETUP)
    assert 'weight_decay_temp' not in no_wd
    # a global batch wider than D: the buffer is (Cl, N)
    wide = head_memory('pfc', 1_000_000, 8, 512, 128, 1.0)
    assert wide['logits_and_grad'] == 125_000 * 1024 * 4


def test_data_parallel_parts_and_ordering():
    dp = predict_memory('dp', **SETUP).peak
    mp = predict_memory('pfc', sample_rate=1.0, **SETUP).peak
    pfc = predict_memory('pfc', sample_rate=0.1, **SETUP).peak
    assert dp > mp > pfc
    parts = head_memory('dp', **SETUP)
    assert parts['centers'] == 1_000_000 * 512 * 4
    assert parts['logits'] == 4 * 128 * 1_000_000 * 4
    assert parts['center_grads'] == 4 * parts['centers']
    with pytest.raises(ValueError, match="'dp' or 'pfc'"):
        head_memory('zero', **SETUP)


def test_rows():
    assert shard_rows(11, 2) == 6 and shard_rows(10, 2) == 5
    assert sampled_rows(1_000_000, 2, 0.1, 128) == 50_000
    assert sampled_rows(1_000_000, 2, 1.0, 128) == 500_000
    # positives only (rate 0): about the distinct labels of the batch
    assert 120 <= sampled_rows(1_000_000, 2, 0.0, 128) <= 128
    # few classes: every local class is a positive
    assert sampled_rows(100, 2, 0.1, 1000) == 50


def test_backbone_terms_and_budget():
    est = predict_memory('pfc', sample_rate=0.1, backbone_params=1000,
                         largest_param=300, activation_bytes=1e4,
                         input_bytes=100, **SETUP)
    assert est.parts['backbone'] == 4 * 1000 * 4 + 300 * 4
    assert est.parts['activations'] == 128 * 10_000
    assert est.parts['inputs'] == 128 * 100
    assert isinstance(est, MemoryEstimate)
    assert est.fits(None) and est.fits(est.peak) and not est.fits(est.peak - 1)
    assert est.peak_gb == est.peak / 2**30


def test_activation_bytes_counts_saved_tensors():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    # conv saves its input (3x8x8), ReLU its output (4x8x8), fp32
    assert activation_bytes_per_sample(conv, (3, 8, 8)) == (192 + 256) * 4
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    # the ReLU output is saved once although two nodes keep it
    assert activation_bytes_per_sample(mlp, (10, )) == (10 + 20) * 4
    half = activation_bytes_per_sample(conv, (3, 8, 8), torch.bfloat16)
    assert half < (192 + 256) * 4


@pytest.mark.parametrize('method,rate', [('pfc', 1.0), ('pfc', 0.1),
                                         ('dp', 1.0)])
def test_prediction_matches_measured_peak(method, rate):
    # every buffer above glibc's 32 MB mmap threshold, so freed memory leaves
    # the resident set and the RSS peak counts tensors (smaller temporaries
    # can stay resident after free and the peak then exceeds the model)
    from mmpfc.benchmark.speed.rows import BenchmarkRow
    from mmpfc.benchmark.speed.worker import run_rank
    row = BenchmarkRow(method=method, sample_rate=rate, label=method,
                       num_classes=100_000,
                       world_size=1, batch_size=128, embedding_size=512,
                       backbone=None, amp=False, device='cpu', steps=2,
                       warmup=1, threads=1, seed=0, gemm=False)
    measured = run_in_fresh_process(run_rank, row).peak_mb * 2**20
    predicted = predict_memory(method, row.num_classes, 1, 512, 128,
                               rate).peak
    print(f'{method} {rate}: measured {measured / 2**20:.0f} MB, '
          f'predicted {predicted / 2**20:.0f} MB')
    assert 0.8 < measured / predicted < 1.2
