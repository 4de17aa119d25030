"""The reference's speed line, the per-rank memory table, a quiet console,
known warnings and tools/plot_log.py."""
import io
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from helpers import load_tool
from messages import assert_mentions
from mmengine.config import Config
from mmengine.logging import MessageHub, MMLogger
from mmengine.runner import Runner

from mmpfc.engine.hooks import (MemoryTableHook, SpeedLogHook,
                                format_memory_table, format_speed_line,
                                rank_memory)
from mmpfc.engine.hooks.speed_log_hook import format_lr, hours_left
from mmpfc.registry import HOOKS
from mmpfc.utils.logging import (QuietConsoleFilter, ignoring_known_warnings,
                                 quiet_console)

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
    for hook in (SpeedLogHook, MemoryTableHook):
        with pytest.raises(ValueError) as err:
            hook(interval=0)
        assert_mentions(err, hook.__name__, 'interval', '>= 1', 'got 0')


# --- the speed line's learning rate, fp16 scale and time left -------------

def test_learning_rate_is_readable_at_any_magnitude():
    assert format_lr(0.2) == '0.2000'
    assert format_lr(1e-4) == '0.0001'
    assert format_lr(1e4) == '10000.0000'
    assert format_lr(0) == '0.0000'
    assert format_lr(2e-5) == '2.0000e-05'
    assert format_lr(12345.6) == '1.2346e+04'
    assert format_speed_line(100.0, 3.0, 2e-5, 1, 50) == (
        'Training: Speed 100.00 samples/sec   Loss 3.0000   '
        'LearningRate 2.0000e-05   Epoch: 1   Global Step: 50')


def test_speed_line_has_the_reference_fp16_and_required_fields():
    assert format_speed_line(
        5299.5612, 1.09649, 0.2, 0, 100, loss_scale=65536.0,
        required_hours=1.4) == REFERENCE + (
            '   Fp16 Grad Scale: 65536   Required: 1 hours')
    assert format_speed_line(5299.5612, 1.09649, 0.2, 0, 100,
                             required_hours=0.2) == (
        REFERENCE + '   Required: 0 hours')
    assert hours_left(36.0, 10, 2000) == 2.0
    assert hours_left(0.0, 0, 100) == 0.0


def speed_runner(start_iter, max_iters, loss_scaler=None):
    """What SpeedLogHook reads of a Runner: 2 ranks x 32 per batch."""
    lines = []
    hub = MessageHub(name=f'speed-hook-test-{start_iter}')
    hub.update_scalar('train/lr', 2e-5)
    hub.update_scalar('train/loss_scale', 1024.0)
    return SimpleNamespace(
        iter=start_iter, max_iters=max_iters, rank=0, world_size=2,
        epoch=0, hooks=[], message_hub=hub, train_loop=object(),
        optim_wrapper=SimpleNamespace(loss_scaler=loss_scaler),
        train_dataloader=SimpleNamespace(batch_size=32,
                                         dataset=list(range(100000))),
        logger=SimpleNamespace(info=lines.append)), lines


def run_ten_iterations(runner, hook):
    """Ten iterations of 3.6 s each (on the hook's clock), loss 2.5."""
    now = [100.0]
    hook.clock = lambda: now[0]
    hook.before_train(runner)
    start = runner.iter
    for i in range(10):
        runner.iter = start + i
        now[0] += 3.6
        hook.after_train_iter(runner, i, None, dict(loss=torch.tensor(2.5)))


def test_speed_hook_logs_the_fp16_scale_and_hours_left():
    # 10 iterations in 36 s: 640 samples / 36 s; 2000 left x 3.6 s = 2 h
    runner, lines = speed_runner(0, 2010, loss_scaler=object())
    run_ten_iterations(runner, SpeedLogHook(interval=10))
    assert lines == [
        'Training: Speed 17.78 samples/sec   Loss 2.5000   LearningRate '
        '2.0000e-05   Epoch: 0   Global Step: 10   Fp16 Grad Scale: 1024   '
        'Required: 2 hours']
    # resumed at 1000: its own pace (10 steps), 1000 left = 1 h; no scaler
    runner, lines = speed_runner(1000, 2010)
    run_ten_iterations(runner, SpeedLogHook(interval=10))
    assert lines == [
        'Training: Speed 17.78 samples/sec   Loss 2.5000   LearningRate '
        '2.0000e-05   Epoch: 0   Global Step: 1010   Required: 1 hours']


# --- quiet console: the start-up blocks go to the log file only -----------

ENV_BLOCK = ('\n' + '-' * 60 + '\nSystem environment:\n    sys.platform: '
             'linux\n    MMEngine: 0.10.7\n\nRuntime environment:\n    '
             'seed: 2048\n' + '-' * 60 + '\n')
CONFIG_BLOCK = "Config:\nmodel = dict(type='FaceRecognizer')\n"
HOOK_BLOCK = ('Hooks will be executed in the following order:\nbefore_run:\n'
              '(VERY_HIGH   ) RuntimeInfoHook                    ')
FILE_CLIENT = ('"FileClient" will be deprecated in future. Please use io '
               'functions in https://mmengine.readthedocs.io/en/latest/api/'
               'fileio.html#file-io')


@pytest.fixture
def mmlogger(tmp_path):
    """An MMLogger with a log file, its console written to a StringIO."""
    name = f'quiet-test-{tmp_path.name}'
    logger = MMLogger.get_instance(name, log_file=str(tmp_path / 'run.log'))
    console = io.StringIO()
    logger.handlers[0].setStream(console)
    yield logger, console, tmp_path / 'run.log'
    for handler in logger.handlers:
        handler.close()
    MMLogger._instance_dict.pop(name, None)


def test_quiet_console_keeps_the_blocks_in_the_file_only(mmlogger):
    logger, console, log_file = mmlogger
    assert quiet_console(logger) is True
    assert quiet_console(logger) is False  # installed once only
    assert sum(isinstance(f, QuietConsoleFilter)
               for f in logger.handlers[0].filters) == 1
    logger.info(ENV_BLOCK)
    logger.info(CONFIG_BLOCK)
    logger.info(HOOK_BLOCK)
    logger.warning(FILE_CLIENT)
    logger.info('Config: read from a.py')  # not the dump: shows
    logger.warning('"FileClient" is fine')  # not the known notice: shows
    logger.info('Checkpoints will be saved to x.')
    shown = [line.split(' - ')[-1] for line in
             console.getvalue().splitlines()]
    assert shown == [f'Environment, config and hook order: see {log_file}',
                     'Config: read from a.py', '"FileClient" is fine',
                     'Checkpoints will be saved to x.']
    text = log_file.read_text()
    for block in (ENV_BLOCK, CONFIG_BLOCK, HOOK_BLOCK, FILE_CLIENT):
        assert block in text
    assert 'Environment, config and hook order' not in text


def test_quiet_console_installs_nothing_without_a_log_file():
    logger = MMLogger.get_instance('quiet-test-no-file')
    console = io.StringIO()
    logger.handlers[0].setStream(console)
    try:
        assert quiet_console(logger) is False
        logger.info(CONFIG_BLOCK)
        assert 'Config:\nmodel = ' in console.getvalue()
    finally:
        MMLogger._instance_dict.pop('quiet-test-no-file', None)


def test_quiet_console_on_a_real_runner(tmp_path, capsys):
    class QuietRunner(Runner):
        def build_logger(self, *args, **kwargs):
            logger = super().build_logger(*args, **kwargs)
            quiet_console(logger)
            return logger

    # a name of its own: MMEngine names a runner's logger after the second
    # it was built in, and would reuse an earlier runner's of that second
    runner = QuietRunner(model=nn.Linear(2, 2), work_dir=str(tmp_path),
                         cfg=Config(dict(answer=42)),
                         default_scope='mmengine',
                         experiment_name=f'quiet-{tmp_path.name}')
    out = capsys.readouterr().out
    assert out.count('Environment, config and hook order: see ') == 1
    for block in ('System environment:', 'Config:', 'answer = 42',
                  'Hooks will be executed in the following order:'):
        assert block not in out
    text = open(runner.logger.log_file).read()
    for block in ('System environment:', 'Config:\nanswer = 42',
                  'Hooks will be executed in the following order:'):
        assert block in text


# --- known third-party warnings --------------------------------------------

MMCV_LITE = ('Fail to import ``MultiScaleDeformableAttention`` from '
             '``mmcv.ops.multi_scale_deform_attn``, You should install '
             '``mmcv`` rather than ``mmcv-lite`` if you need this module. ')
MKL = ('Setting MKL_NUM_THREADS environment variable for each process to be '
       '1 in default, to avoid your system being overloaded, please further '
       'tune the variable for optimal performance in your application as '
       'needed.')


def shown_warnings(*emitted):
    """The (message, category) pairs that pass the filters within
    ``ignoring_known_warnings``; the filters are back as before after it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        before = list(warnings.filters)
        with ignoring_known_warnings():
            assert len(warnings.filters) == len(before) + 2
            for message, category, module in emitted:
                warnings.warn_explicit(message, category, f'{module}.py', 1,
                                       module=module)
        assert warnings.filters == before
    return [(str(w.message), w.category) for w in caught]


def test_known_warnings_are_filtered_and_others_still_show():
    shown = shown_warnings(
        (MMCV_LITE, UserWarning, 'mmcv.cnn.bricks.transformer'),
        (MKL, UserWarning, 'mmengine.utils.dl_utils.setup_env'),
        (MKL.replace('MKL', 'OMP'), UserWarning,
         'mmengine.utils.dl_utils.setup_env'),
        # same category, same module, another message: shows
        ('Something else', UserWarning, 'mmcv.cnn.bricks.transformer'),
        # the same message from another module: shows
        (MKL, UserWarning, 'mmpfc.engine'),
        (MKL, UserWarning, 'mmengine.utils.dl_utils.setup_env_x'),
        # the same message and module, another category: shows
        (MMCV_LITE, DeprecationWarning, 'mmcv.cnn.bricks.transformer'))
    assert shown == [('Something else', UserWarning), (MKL, UserWarning),
                     (MKL, UserWarning), (MMCV_LITE, DeprecationWarning)]


# --- tools/plot_log.py ------------------------------------------------------

def load_plot_log():
    return load_tool('plot_log.py')


SCALARS = (
    '{"lr": 0.09, "data_time": 0.02, "loss": 44.6, "time": 2.0, '
    '"speed": 31.7, "mem_used_mb": 1454.7, "iter": 10, "step": 10}\n'
    '{"lr": 0.06, "data_time": 0.02, "loss": 42.5, "time": 1.6, '
    '"speed": 51.2, "mem_used_mb": 1455.0, "memory": 900, "iter": 20, '
    '"step": 20}\n'
    '{"lfw/accuracy": 0.9, "step": 20}\n')


def test_plot_log_draws_the_newest_run_of_a_work_dir(tmp_path, capsys):
    plot_log = load_plot_log()
    for run, text in (('20250101_000000', '{"loss": 1, "step": 1}\n'),
                      ('20250102_000000', SCALARS)):
        (tmp_path / run / 'vis_data').mkdir(parents=True)
        (tmp_path / run / 'vis_data' / 'scalars.json').write_text(text)
    out = tmp_path / 'curves.png'
    keys = plot_log.main([str(tmp_path), '-o', str(out)])
    assert keys == ['loss', 'speed', 'lr', 'mem_used_mb', 'memory']
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '20250102_000000' in capsys.readouterr().out
    # given the file itself, the PNG goes next to it
    scalars = tmp_path / '20250101_000000' / 'vis_data' / 'scalars.json'
    assert plot_log.main([str(scalars)]) == ['loss']
    assert (scalars.parent / 'scalars.png').read_bytes()[:4] == b'\x89PNG'


def test_plot_log_errors_name_the_dir_and_the_line(tmp_path):
    plot_log = load_plot_log()
    missing = re.escape(f'no scalars.json in {str(tmp_path)!r}')
    with pytest.raises(FileNotFoundError, match=missing):
        plot_log.main([str(tmp_path)])
    bad = tmp_path / 'scalars.json'
    bad.write_text('{"loss": 1, "step": 1}\n{"loss": 2, "st\n')
    with pytest.raises(ValueError,
                       match=re.escape(f'{bad}, line 2: not JSON')):
        plot_log.main([str(bad)])
