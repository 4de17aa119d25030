"""Margins and sub-centers in the memory model.

The expected figures are written out from the byte counts (fp32 4 bytes,
the 17 bytes per cosine of a chunk that CurricularFace's backward holds,
the uint8 sub-center map), not taken from the code under test; one
measurement (in this process) checks the CurricularFace term where it is
large.
"""
import pytest
from dist_utils import run_in_fresh_process

from mmpfc.benchmark.memory_model import (RUNTIME_SLACK, head_memory,
                                          max_num_classes, predict_memory)

SETUP = dict(num_classes=1_000_000, world_size=2, embedding_size=512,
             batch_size=128)
CL, D, N = 500_000, 512, 256  # shard rows, embedding size, global batch
S = 50_000  # sampled rows at 0.1


def test_non_target_margin_keeps_one_slope_per_logit():
    plain = head_memory('pfc', sample_rate=0.1, **SETUP)
    parts = head_memory('pfc', sample_rate=0.1, non_target_margin=True,
                        **SETUP)
    assert parts.pop('non_target_slope') == 4 * S * N  # fp32 (S, N)
    assert parts == plain
    # model parallel: every row of the shard
    mp = head_memory('pfc', non_target_margin=True, **SETUP)
    assert mp['non_target_slope'] == 4 * CL * N
    # the other margins, and DP, have no such term
    assert 'non_target_slope' not in plain
    with pytest.raises(ValueError, match='non-target margins'):
        head_memory('dp', non_target_margin=True, **SETUP)


def test_subcenters_widen_the_rows():
    k = 3
    parts = head_memory('pfc', sample_rate=0.1, num_subcenters=k, **SETUP)
    assert parts == dict(centers=CL * k * D * 4, momentum=CL * k * D * 4,
                         logits_and_grad=S * max(N, k * D) * 4,
                         embeddings=4 * N * D * 4,
                         subcenter_argmax=S * N,
                         sampling=CL * 4 + 12 * S)
    mp = head_memory('pfc', num_subcenters=k, **SETUP)
    assert mp['weight_decay_temp'] == CL * k * D * 4
    assert mp['logits_and_grad'] == CL * k * D * 4
    # about ArcFace over as many rows (3M identities): a few MB apart
    arc = predict_memory('pfc', sample_rate=0.1,
                         **dict(SETUP, num_classes=3_000_000)).peak
    sub = predict_memory('pfc', sample_rate=0.1, num_subcenters=k,
                         **SETUP).peak
    assert abs(sub - arc) < 16 * 2**20
    # the identities that fit: a third of ArcFace's, about
    budget = 16 * 2**30
    fit_sub = max_num_classes(budget, 'pfc', 2, sample_rate=0.1,
                              num_subcenters=k)
    fit_arc = max_num_classes(budget, 'pfc', 2, sample_rate=0.1)
    assert fit_sub == pytest.approx(fit_arc / 3, rel=0.02)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match='num_subcenters'):
            head_memory('pfc', num_subcenters=bad, **SETUP)
    with pytest.raises(ValueError, match='sub-centers'):
        head_memory('dp', num_subcenters=k, **SETUP)


def test_curricular_face_term_matches_measured_peak():
    """CurricularFace keeps the (S, N) slope of its non-target logits for
    backward; at a global batch of 1024 (> D) that is the logit buffer
    once more, 13 % of this peak (measured 590 MB, predicted 603 MB;
    without the term 525 MB)."""
    from mmpfc.benchmark.speed.rows import BenchmarkRow
    from mmpfc.benchmark.speed.worker import run_rank
    classes, batch, rate = 100_000, 1024, 0.2
    row = BenchmarkRow(method='pfc', sample_rate=rate, label='pfc',
                       num_classes=classes, world_size=1, batch_size=batch,
                       embedding_size=512, backbone=None, amp=False,
                       device='cpu', steps=1, warmup=1, threads=1, seed=0,
                       gemm=False,
                       loss=dict(type='CurricularFaceLoss', s=64.0, m=0.5))
    measured = run_in_fresh_process(run_rank, row).peak_mb * 2**20
    estimate = predict_memory('pfc', classes, 1, 512, batch, rate,
                              non_target_margin=True)
    term = estimate.parts['non_target_slope']
    assert term == 4 * 20_000 * batch  # the 20,000 sampled rows
    print(f'measured {measured / 2**20:.0f} MB, predicted '
          f'{estimate.peak / 2**20:.0f} MB (term {term / 2**20:.0f} MB, '
          f'slack {RUNTIME_SLACK / 2**20:.0f} MB)')
    assert 0.9 < measured / estimate.peak < 1.1
    assert measured / (estimate.peak - term) > 1.1
