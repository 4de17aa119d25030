"""tools/fit_check.py: the peak per GPU, what fits, the step estimate and
the errors, for real configs (virtual GPUs, no GPU needed).

Expected sizes are written out here: r50 at 3M identities on 8 GPUs holds
375,000 fp32 centers of 512 values per GPU (768,000,000 bytes), as many
momentum values, and 128 images of 3 x 112 x 112 fp32 inputs.
"""
import json
import os

import pytest
from helpers import load_tool
from mmengine.config import Config

from mmpfc.benchmark.fit_check import check_fit, parse_size, predict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
R50_PFC = os.path.join(ROOT, 'configs/pfc/r50_pfc0.1_3m.py')
GiB = 2**30


@pytest.fixture(scope='module')
def tool():
    return load_tool('fit_check.py')


def run_json(tool, capsys, *argv):
    assert tool.main([R50_PFC, '--no-timing', '--json', *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_report_of_r50_pfc_3m(tool, capsys):
    out = run_json(tool, capsys, '--gpus', '8', '--gpu-memory', '32GB')
    assert out['parts']['centers'] == 375_000 * 512 * 4
    assert out['parts']['momentum'] == 375_000 * 512 * 4
    assert out['parts']['inputs'] == 128 * 3 * 112 * 112 * 4
    assert out['peak_bytes'] == sum(out['parts'].values())
    assert out['fits'] is True and out['gpu_memory'] == 32 * GiB
    # the centers and momentum grow by 2 x 2,048 bytes per identity and
    # GPU: 24 GiB of headroom hold tens of millions more
    assert 30_000_000 < out['max_num_classes'] < 60_000_000
    assert out['max_batch_size'] > 128


def test_too_small_gpu_gets_what_would_fit(tool, capsys):
    out = run_json(tool, capsys, '--gpus', '8', '--gpu-memory', '7.5GiB')
    assert out['fits'] is False and out['peak_bytes'] > 7.5 * GiB
    assert out['max_batch_size'] < 128
    assert out['max_num_classes'] < 3_000_000
    # bf16 centers and state halve 1.5 GB of the shard: that fits
    assert out['fitting_storage'] in (['bfloat16', 'bfloat16'],
                                      ['bfloat16', 'int8'])


def test_largest_counts_are_edges():
    cfg = Config.fromfile(R50_PFC)
    report = check_fit(cfg, 8, 12 * GiB, timing=False)
    from mmpfc.benchmark.fit_check import head_setup
    from mmpfc.benchmark.gpu_memory import model_figures
    setup = head_setup(cfg, 8)
    figures = model_figures(dict(cfg.model, head=None))
    peak = predict(figures, setup, 8, batch_size=report.max_batch_size)
    assert peak.peak <= 12 * GiB
    over = predict(figures, setup, 8, batch_size=report.max_batch_size + 1)
    assert over.peak > 12 * GiB


def test_step_estimate_and_speed_ratio(tool, capsys):
    """The head's share and the PFC0.1 / MP ratio: model parallel computes
    and steps all 375,000 local centers per GPU, Partial FC 0.1 a tenth."""
    mbf = os.path.join(ROOT, 'configs/pfc/mbf_pfc0.1_demo_cpu.py')
    assert tool.main([mbf, '--gpus', '8', '--gpu', 'a100', '--json',
                      '--cfg-options', 'model.head.num_classes=3000000',
                      'train_dataloader.batch_size=32']) == 0
    out = json.loads(capsys.readouterr().out)
    times = out['step_seconds']
    assert times['total'] == pytest.approx(
        times['forward'] + times['backward'] + times['step'])
    assert out['samples_per_second'] == pytest.approx(
        8 * 32 / times['total'])
    assert 0 < out['head_share'] < 1
    assert out['pfc_over_mp'] > 1.5
    assert out['gpu'].startswith('A100')


@pytest.mark.parametrize('argv,message', [
    (['--gpus', '8', '--gpu', 'P100'], "unknown GPU 'P100'"),
    (['--gpus', '8', '--gpu-memory', '32 bananas'],
     "GPU memory '32 bananas' is not a size"),
    (['--gpus', '0'], '--gpus must be a positive integer, got 0'),
    (['--gpus', '8', '--cfg-options', 'model.backbone.type=NoSuchNet'],
     'cannot be built: KeyError'),
])
def test_bad_input_is_named(tool, capsys, argv, message):
    assert tool.main([R50_PFC, '--no-timing', *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('text,expected', [
    ('32GB', 32 * GiB), ('24 GiB', 24 * GiB), ('16000MB', 16000 * 2**20),
    ('80', 80 * GiB), ('1.5g', int(1.5 * GiB))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


PREFIX = '12/06 10:00:{:02d} - mmengine - INFO - '
SPEED = ('Training: Speed {} samples/sec   Loss 40.1000   LearningRate '
         '0.2000   Epoch: 0   Global Step: {}')
TABLE = ('Memory per rank after step {}, device memory (used/total of the '
         'GPU; peak = max allocated by the process since the previous '
         'table):\n[0] gpu1 cuda:0 |  {} /  81559 MB | peak  {} MB | '
         'reserved  {} MB')
#: A run's log as SpeedLogHook and MemoryTableHook write it.
RUN_LOG = '\n'.join([
    PREFIX.format(1) + SPEED.format('1201.50', 20) + '   Fp16 Grad Scale: '
    '65536',
    PREFIX.format(1) + TABLE.format(20, 20000, 15000, 17000),
    PREFIX.format(9) + SPEED.format('3000.00', 40),
    PREFIX.format(17) + SPEED.format('3100.00', 60),
    PREFIX.format(17) + TABLE.format(60, 21000, 14000, 18000), ''])


def test_run_log_beside_the_prediction(tool, capsys, tmp_path):
    log = tmp_path / 'run.log'
    log.write_text(RUN_LOG)
    assert tool.main([R50_PFC, '--no-timing', '--json', '--gpus', '1',
                      '--gpu', 'NVIDIA H100 80GB HBM3', '--run-log',
                      str(log)]) == 0
    out = json.loads(capsys.readouterr().out)
    # the first interval (warm-up) left out: median of 3000 and 3100
    assert out['run']['steady_speed'] == 3050.0
    assert out['run']['speeds'] == [1201.5, 3000.0, 3100.0]
    assert (out['run']['used_mb'], out['run']['peak_mb'],
            out['run']['reserved_mb']) == (21000, 15000, 18000)
    assert out['gpu'].startswith('H100')

    assert tool.main([R50_PFC, '--no-timing', '--gpus', '1', '--run-log',
                      str(log)]) == 0
    text = capsys.readouterr().out
    # one GPU holds all 3M fp32 centers and their momentum: the tensors
    # predicted are at least those 2 x 3e6 x 512 x 4 bytes
    row = next(line for line in text.splitlines()
               if line.startswith('| tensors at the peak'))
    measured, predicted, ratio = row.split('|')[2:5]
    assert float(measured) == 15000
    assert float(predicted) > 2 * 3e6 * 512 * 4 / 2**20
    assert float(ratio) == pytest.approx(15000 / float(predicted), abs=0.01)
    assert '| samples/s (median past the first interval) | 3050 | - | - |' \
        in text


def test_run_log_without_figures_is_named(tool, capsys, tmp_path):
    log = tmp_path / 'empty.log'
    log.write_text('nothing here\n')
    assert tool.main([R50_PFC, '--no-timing', '--gpus', '1', '--run-log',
                      str(log)]) == 2
    err = capsys.readouterr().err
    assert 'empty.log: no speed line' in err


def test_step_estimate_on_one_gpu(tool, capsys):
    """One GPU (what tools/check_gpu.sh asks): the head-less step uses a
    head of one identity, whose label check must pass on the virtual GPU."""
    mbf = os.path.join(ROOT, 'configs/pfc/mbf_pfc0.1_demo_cpu.py')
    assert tool.main([mbf, '--gpus', '1', '--gpu', 'H100', '--json',
                      '--cfg-options', 'model.head.num_classes=300000',
                      'train_dataloader.batch_size=32']) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['samples_per_second'] == pytest.approx(
        32 / out['step_seconds']['total'])
    assert 0 < out['head_share'] < 1


def test_replicated_head_share_is_not_reported_as_zero(tool, capsys):
    """A data-parallel head has no head-less stand-in to time against: its
    share is absent (null, and said so in the text), not 0 %."""
    dp = os.path.join(ROOT, 'configs/pfc/r50_dp_3m.py')
    small = ['model.head.num_classes=1000', 'train_dataloader.batch_size=8']
    assert tool.main([dp, '--gpus', '2', '--gpu', 'A100', '--json',
                      '--cfg-options', *small]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out['head_share'] is None and out['step_seconds']['total'] > 0
    assert tool.main([dp, '--gpus', '2', '--gpu', 'A100',
                      '--cfg-options', *small]) == 0
    text = capsys.readouterr().out
    assert "the head's share of the step: not estimated" in text
    assert 'the head takes' not in text
