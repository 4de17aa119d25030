"""SIGTERM / SIGUSR1 on 2 gloo ranks: every rank finishes its iteration,
they save that iteration together (also when the signal lands during a
save) and stop; the resumed run ends bit-equal to a straight run."""
import os
import os.path as osp
import signal

import pytest
import torch
from dist_utils import run_distributed
from messages import assert_mentions
from mmengine.hooks import Hook
from tiny_training import build_runner, head_state, make_cfg

from mmpfc.checkpoint import load_file
from mmpfc.engine.hooks import PreemptionHook, TrainingPreempted
from mmpfc.registry import HOOKS

MAX_ITERS = 8


@HOOKS.register_module(force=True)
class SendSignalHook(Hook):
    """Sends ``signum`` to this process after iteration ``at`` (1-based)
    of rank ``rank``, or while that iteration's checkpoint is being saved
    (``during_save``)."""

    priority = 'HIGHEST'

    def __init__(self, at: dict, signum: int = signal.SIGTERM,
                 during_save: bool = False) -> None:
        self.at, self.signum, self.during_save = at, signum, during_save

    def _due(self, runner) -> bool:
        return self.at.get(runner.rank) == runner.iter + 1

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if not self.during_save and self._due(runner):
            os.kill(os.getpid(), self.signum)

    def before_save_checkpoint(self, runner, checkpoint):
        if self.during_save and self._due(runner):
            os.kill(os.getpid(), self.signum)
            runner.signalled_during_save = True


def run(rank, world_size, work_dir, signal_hook=None, resume=False,
        interval=100):
    cfg = make_cfg(work_dir, world_size=world_size, max_iters=MAX_ITERS,
                   interval=interval, resume=resume)
    cfg.custom_hooks = [*cfg.custom_hooks, dict(type='PreemptionHook')]
    if signal_hook is not None:
        cfg.custom_hooks.append(dict(type='SendSignalHook', **signal_hook))
    runner = build_runner(cfg)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        runner.train()
        outcome = None
    except TrainingPreempted as stop:
        outcome = stop.checkpoint
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    return dict(outcome=outcome, state=head_state(runner),
                during_save=getattr(runner, 'signalled_during_save', False))


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('straight'))
    return run_distributed(run, 2, work_dir)


def assert_same_end(resumed, straight):
    for rank in range(2):
        got, ref = resumed[rank]['state'], straight[rank]['state']
        assert got['iter'] == ref['iter'] == MAX_ITERS
        assert torch.equal(got['weight'], ref['weight'])
        assert torch.equal(got['momentum'], ref['momentum'])
        for key, value in ref['backbone'].items():
            assert torch.equal(got['backbone'][key], value), key


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGUSR1])
def test_signal_mid_interval_saves_the_iteration_and_resumes_exactly(
        straight, tmp_path, signum):
    # the signal reaches rank 0 after iteration 3, rank 1 after 5: they
    # agree on 3, the earliest, and nothing after it is lost
    stopped = run_distributed(run, 2, str(tmp_path), dict(
        at={0: 3, 1: 5}, signum=int(signum)))
    path = osp.join(str(tmp_path), 'iter_3.pth')
    assert [r['outcome'] for r in stopped] == [path, path]
    assert load_file(path)['meta']['iter'] == 3
    assert osp.isfile(path + '.sum')
    with open(osp.join(str(tmp_path), 'last_checkpoint')) as f:
        assert f.read().strip() == path
    resumed = run_distributed(run, 2, str(tmp_path), None, True)
    assert [r['outcome'] for r in resumed] == [None, None]
    assert_same_end(resumed, straight)


def test_signal_during_a_save_lets_it_finish_and_stops_there(
        straight, tmp_path):
    # the regular save of iteration 4 is in progress when rank 0 gets the
    # signal: that save completes, is the preemption checkpoint (no second
    # save of the same iteration), and the run stops after it
    stopped = run_distributed(run, 2, str(tmp_path), dict(
        at={0: 4}, during_save=True), False, 4)
    path = osp.join(str(tmp_path), 'iter_4.pth')
    assert stopped[0]['during_save']
    assert [r['outcome'] for r in stopped] == [path, path]
    assert sorted(n for n in os.listdir(str(tmp_path))
                  if n.endswith('.pth')) == ['iter_4.pth']
    resumed = run_distributed(run, 2, str(tmp_path), None, True, 4)
    assert_same_end(resumed, straight)


def test_handlers_are_only_installed_while_training(tmp_path):
    hook = PreemptionHook()
    before = signal.getsignal(signal.SIGTERM)
    assert hook.install_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is not before
    assert hook.received is None
    os.kill(os.getpid(), signal.SIGTERM)  # only noted, by this hook
    assert hook.received == signal.SIGTERM
    hook.restore_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize('kwargs,named', [
    (dict(signals=['SIGNOPE']), ('signals', "'SIGTERM'", "['SIGNOPE']")),
    (dict(agreement_timeout=0), ('agreement_timeout', '> 0', 'got 0')),
    (dict(repeat_window='2'), ('repeat_window', '> 0', "got '2'")),
])
def test_bad_arguments_are_named(kwargs, named):
    with pytest.raises(ValueError) as err:
        PreemptionHook(**kwargs)
    assert_mentions(err, 'PreemptionHook', *named)


def test_a_second_signal_later_kills_at_once(tmp_path):
    """The same signal again within the repeat window (torchrun forwarding
    what Slurm sent the whole job) is one request; later, it kills."""
    import subprocess
    import sys
    script = '''
import os, signal, sys, time
from mmpfc.engine.hooks import PreemptionHook
hook = PreemptionHook(repeat_window=0.5)
hook.install_signal_handlers()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGTERM)  # at once: the same request
print('alive', hook.received == signal.SIGTERM, flush=True)
time.sleep(1.0)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print('not killed', flush=True)
'''
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.split('\n')[0] == 'alive True'
    assert proc.returncode == -signal.SIGTERM
    assert 'not killed' not in proc.stdout


def test_checkpoint_hooks_are_looked_at_before_training():
    """By-epoch checkpoints cannot hold the iteration in flight: refused at
    the start. Without any CheckpointHook the run is told at the start that
    a signal would stop it unsaved."""
    from types import SimpleNamespace

    from mmengine.hooks import CheckpointHook
    warnings = []
    runner = SimpleNamespace(
        hooks=[CheckpointHook(interval=1, by_epoch=True)],
        logger=SimpleNamespace(warning=warnings.append))
    with pytest.raises(ValueError) as err:
        PreemptionHook().before_train(runner)
    assert_mentions(err, 'by_epoch=True', 'by_epoch=False')
    assert not warnings
    runner.hooks = []
    PreemptionHook().before_train(runner)
    assert len(warnings) == 1
    assert_mentions(warnings[0], 'CheckpointHook', 'default_hooks.checkpoint',
                    'nothing saved', 'default_hooks.preemption=None')


def test_preemption_marker_is_created_or_its_failure_logged(tmp_path,
                                                            monkeypatch):
    import logging

    from mmpfc.engine.hooks.preemption_hook import mark_preempted
    marker = tmp_path / 'preempted'
    monkeypatch.setenv('MMPFC_PREEMPTED_FILE', str(marker))
    mark_preempted()
    assert marker.is_file()
    monkeypatch.setenv('MMPFC_PREEMPTED_FILE', str(tmp_path / 'no' / 'x'))
    logged = []

    class Logger(logging.Logger):
        def warning(self, msg, *args, **kwargs):
            logged.append(msg)
    mark_preempted(Logger('test'))  # no exception: exit 75 stays 75
    assert logged and str(tmp_path / 'no' / 'x') in logged[0]
