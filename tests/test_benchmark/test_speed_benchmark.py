"""Smoke tests of the benchmark (tiny sizes; the targets are the benchmark's
own business, never asserted on timings here)."""
import json
import os.path as osp
import sys
from dataclasses import replace

import pytest
from helpers import ROOT, benchmark_record

from mmpfc.benchmark.head_methods import parse_method
from mmpfc.benchmark.speed import (BenchmarkConfig, BenchmarkRecord,
                                   BenchmarkRow, make_rows, markdown,
                                   parse_count, ratio_checks, summarize_launch)
from mmpfc.benchmark.speed.worker import run_rank

# the limits are the caller's (tools/benchmark.py has the project's)
LIMITS = {'time': 1 / 6, 'memory': 0.55, 'shard': 2.2, 'gemm': 1.5}

TINY = dict(num_classes=300, world_size=1, batch_size=4, embedding_size=8,
            backbone=None, amp=False, device='cpu', steps=2, warmup=1,
            threads=1, seed=0, gemm=True)


@pytest.mark.parametrize('spec,expected', [
    ('dp', ('DP', 'dp', 1.0)), ('MP', ('MP', 'pfc', 1.0)),
    ('pfc0.1', ('PFC0.1', 'pfc', 0.1)), ('pfc0', ('PFC0', 'pfc', 0.0)),
    ('pfc1.0', ('MP', 'pfc', 1.0))])
def test_parse_method(spec, expected):
    got = parse_method(spec)
    assert (got.label, got.method, got.sample_rate) == expected


@pytest.mark.parametrize('bad', ['pfc', 'pfc1.5', 'tp', ''])
def test_parse_method_refuses(bad):
    with pytest.raises(ValueError, match='pfc<rate>'):
        parse_method(bad)


def test_parse_count():
    for text in ('1000000', '1,000,000', '1M', '1000k', '1e6'):
        assert parse_count(text) == 1_000_000
    assert parse_count('1.4M') == 1_400_000
    for bad in ('0', '-5', 'many', '1.5'):
        with pytest.raises(ValueError, match='positive integer'):
            parse_count(bad)


@pytest.mark.parametrize('method,rate', [('dp', 1.0), ('pfc', 1.0),
                                         ('pfc', 0.2)])
def test_one_rank_head_only(method, rate):
    row = BenchmarkRow(**TINY, method=method, sample_rate=rate,
                       label=method)
    result = run_rank(0, 1, row)
    for phase in ('head', 'optimizer'):
        assert len(result.times[phase]) == row.steps
    assert result.num_local == 300
    assert result.rows_per_step == (60 if rate < 1 else 300)
    assert result.peak_mb >= 0 and result.loss > 0
    assert set(result.gemm) == {'forward', 'grad_embedding', 'grad_centers'}
    launch = summarize_launch([result])
    assert launch.step_s > 0


def fake_record(method, classes, step, peak, gemm=None):
    record = benchmark_record(method, step, peak, classes)
    if gemm:
        record = replace(record, measured=replace(
            record.measured, gemm_s=gemm, gemm_parts_s=dict(forward=gemm)))
    return record


def test_targets_and_table():
    shard_mb = 500_000 * 512 * 4 / 2**20
    records = [fake_record('mp', 10**6, 6.0, 3900, gemm=3.0),
               fake_record('pfc0.1', 10**6, 0.7, 2.1 * shard_mb),
               fake_record('mp', 1000, 1.0, 10, gemm=0.1),
               fake_record('pfc0.1', 1000, 1.0, 10),
               BenchmarkRecord(BenchmarkRow(label='DP', method='dp',
                                            sample_rate=1.0,
                                            num_classes=10**6,
                                            predicted_mb=9e4),
                               status='does not fit')]
    checks = {(c.num_classes, c.target): c
              for c in ratio_checks(records, LIMITS, 10**6)}
    big = {k[1]: c for k, c in checks.items() if k[0] == 10**6}
    assert big['PFC0.1 step / MP step'].passed
    assert big['PFC0.1 peak / MP peak'].value == pytest.approx(
        2.1 * shard_mb / 3900)
    assert big['PFC0.1 peak / shard fp32 weight'].value == \
        pytest.approx(2.1)
    assert big['MP step / its 3 GEMMs alone'].value == 2.0
    assert big['MP step / its 3 GEMMs alone'].passed is False
    small = [c for k, c in checks.items() if k[0] == 1000]
    assert small and all(c.passed is None for c in small)
    table = markdown(records, list(checks.values()))
    lines = table.splitlines()
    assert lines[0] == ('| identities | MP speed | PFC0.1 speed | DP speed | '
                        'MP mem | PFC0.1 mem | DP mem |')
    assert '| 1,000,000 | 42.7 | 366 | - | 3900 | 2051 | - |' in table
    assert 'FAIL' in table and 'PASS' in table


def test_command_line_full_model_and_does_not_fit(tmp_path):
    """Two gloo ranks, MobileFaceNet: PFC runs, DP is refused by budget."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import benchmark as tool
    argv = ['--methods', 'pfc0.5,dp', '--num-classes', '20k', '--nproc', '2',
            '--batch-size', '2', '--embedding-size', '16', '--backbone',
            'mbf', '--steps', '1', '--warmup', '1', '--device', 'cpu',
            '--out-dir', str(tmp_path)]
    rows = make_rows(tool.build_config(tool.parse_args(argv)))
    pfc_mb, dp_mb = (r.predicted_mb for r in rows)
    assert dp_mb > pfc_mb
    budget_gb = (pfc_mb + dp_mb) / 2 / 1024
    assert tool.main(argv + ['--memory-budget-gb', str(budget_gb)]) == 0
    with open(tmp_path / 'benchmark.json') as f:
        out = json.load(f)
    pfc, dp = out['rows']
    assert dp['status'] == 'does not fit' and pfc['status'] == 'ok'
    assert pfc['phases_s']['backbone_forward'] > 0
    assert pfc['samples_per_s'] > 0 and pfc['peak_mb'] > 0
    assert out['config']['world_size'] == 2
    for name in ('benchmark.md', 'speed.png', 'memory.png'):
        assert (tmp_path / name).stat().st_size > 0
    assert '| 20,000 |' in (tmp_path / 'benchmark.md').read_text()


def test_config_defaults():
    cfg = BenchmarkConfig(world_size=2, threads=None)
    assert cfg.resolved_threads() >= 1
    assert cfg.budget_bytes() > 0


def test_ratio_checks_refuse_an_unknown_ratio():
    with pytest.raises(ValueError, match=r"unknown ratio keys \['speed'\]"):
        ratio_checks([], {'speed': 1.0})
