"""The reference's speed line and the per-rank memory table."""
import re

import pytest

from mmpfc.engine.hooks import (MemoryTableHook, SpeedLogHook,
                                format_memory_table, format_speed_line,
                                rank_memory)
from mmpfc.registry import HOOKS

REFERENCE = ('Training: Speed 5299.56 samples/sec   Loss 1.0965   '
             'LearningRate 0.2000   Epoch: 0   Global Step: 100')


def test_speed_line_is_the_reference_format():
    assert format_speed_line(5299.5612, 1.09649, 0.2, 0, 100) == REFERENCE
    line = format_speed_line(12.3, 40.123456, 0.0123456, 3, 2000)
    assert line == ('Training: Speed 12.30 samples/sec   Loss 40.1235   '
                    'LearningRate 0.0123   Epoch: 3   Global Step: 2000')
    assert re.fullmatch(r'Training: Speed \S+ samples/sec(   \S+ \S+){2}'
                        r'(   [A-Za-z ]+: \d+){2}', line)


def test_memory_table_has_one_row_per_rank():
    rows = [dict(rank=r, host='node1', kind='cpu', device='cpu (RSS)',
                 used=1000.4 + r, total=24106, peak=1200, reserved=None)
            for r in range(2)]
    table = format_memory_table(rows, step=50)
    lines = table.splitlines()
    assert lines[0].startswith('Memory per rank after step 50, process RSS')
    assert lines[1] == ('[0] node1 cpu (RSS) |   1000 /  24106 MB | '
                        'peak   1200 MB')
    assert lines[2].startswith('[1] node1 cpu (RSS) |   1001 /')
    gpu = [dict(rank=0, host='n', kind='cuda', device='cuda:0 H200',
                used=10473, total=143771, peak=9800, reserved=10000)]
    assert 'device memory' in format_memory_table(gpu, 1)
    assert format_memory_table(gpu, 1).endswith(
        '| peak   9800 MB | reserved  10000 MB')


def test_rank_memory_reports_this_process():
    row = rank_memory(3)
    assert row['rank'] == 3 and row['kind'] in ('cpu', 'cuda')
    assert 0 < row['used'] <= row['peak'] + 1 and row['used'] < row['total']


def test_hooks_build_from_the_registry_and_check_arguments():
    assert isinstance(HOOKS.build(dict(type='SpeedLogHook')), SpeedLogHook)
    hook = HOOKS.build(dict(type='MemoryTableHook', interval=7))
    assert isinstance(hook, MemoryTableHook) and hook.interval == 7
    with pytest.raises(ValueError, match='interval'):
        SpeedLogHook(interval=0)
    with pytest.raises(ValueError, match='interval'):
        MemoryTableHook(interval=0)
