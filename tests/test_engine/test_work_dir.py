"""A work dir's checkpoints: never overwritten by a new run unless asked,
``last_checkpoint`` resolved in the dir itself, a finished run left alone."""
import os
import os.path as osp
import shutil

import pytest
import torch
from messages import assert_mentions
from mmengine.hooks import Hook
from tiny_training import build_runner, make_cfg

import mmpfc  # noqa: F401
from mmpfc.engine.runners.work_dir import (LAUNCH_FILE, WorkDirInUseError,
                                           existing_checkpoints,
                                           resolve_last_checkpoint)
from mmpfc.registry import HOOKS


def train(work_dir, max_iters=2, overwrite=False, extra_hooks=(), **kwargs):
    cfg = make_cfg(str(work_dir), max_iters=max_iters, interval=2, **kwargs)
    cfg.overwrite = overwrite
    cfg.custom_hooks += [dict(type=name) for name in extra_hooks]
    runner = build_runner(cfg)
    runner.train()
    return runner


def snapshot(folder):
    """name -> (size, mtime_ns) of every file under ``folder``."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = osp.join(root, name)
            if '.pth' in path or name == 'last_checkpoint':
                st = os.stat(path)
                found[osp.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A work dir with a finished 2-iteration run (iter_2.pth)."""
    work_dir = tmp_path_factory.mktemp('finished')
    train(work_dir)
    return work_dir


def test_new_run_refuses_a_dir_with_another_runs_checkpoints(finished):
    before = snapshot(finished)
    with pytest.raises(WorkDirInUseError) as info:
        train(finished)
    message = str(info.value)
    for expected in ('iter_2.pth', 'last_checkpoint', '--resume',
                     '--work-dir', '--overwrite'):
        assert expected in message
    assert snapshot(finished) == before  # nothing touched


def test_overwrite_replaces_them_on_purpose(finished, tmp_path):
    work_dir = tmp_path / 'copy'
    shutil.copytree(finished, work_dir)
    before = snapshot(work_dir)
    train(work_dir, overwrite=True)
    after = snapshot(work_dir)
    assert after['iter_2.pth'] != before['iter_2.pth']


def test_resume_of_a_finished_run_trains_nothing(finished):
    before = snapshot(finished)
    runner = train(finished, resume=True)
    assert runner.iter == 2
    assert snapshot(finished) == before
    lines = logged_lines(runner)
    assert any(str(finished) in line and 'complete' in line and
               'iteration 2' in line and 'max_iters=2' in line
               for line in lines), lines


def logged_lines(runner):
    """The lines of the runner's log files."""
    lines = []
    for handler in runner.logger.handlers:
        path = getattr(handler, 'baseFilename', None)
        if path and osp.isfile(path):
            with open(path) as f:
                lines += f.read().splitlines()
    return lines


def test_ranks_restarted_by_torchrun_resume_by_themselves(
        finished, tmp_path, monkeypatch):
    """torchrun --max-restarts: the restarted ranks find their own run's
    checkpoints and resume from the latest instead of refusing them."""
    work_dir = tmp_path / 'run'
    shutil.copytree(finished, work_dir)
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    runner = train(work_dir, max_iters=4)  # no --resume
    assert runner.captured['iter'] == 2  # started from iter_2.pth
    assert runner.iter == 4 and osp.isfile(work_dir / 'iter_4.pth')
    # a first start (restart count 0) still refuses
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '0')
    with pytest.raises(WorkDirInUseError):
        train(work_dir, max_iters=6)


def test_moved_work_dir_resumes_from_itself(finished, tmp_path):
    moved = tmp_path / 'moved'
    shutil.copytree(finished, tmp_path / 'original')
    shutil.move(str(tmp_path / 'original'), moved)  # the old path is gone
    runner = train(moved, max_iters=4, resume=True)
    assert runner.iter == 4
    assert osp.isfile(moved / 'iter_4.pth')


def test_copied_work_dir_resumes_from_its_own_copy(finished, tmp_path):
    copy = tmp_path / 'copy'
    shutil.copytree(finished, copy)
    assert resolve_last_checkpoint(str(copy)) == str(copy / 'iter_2.pth')
    # the original dir's file would be read if the copy were ignored
    original = tmp_path / 'original'
    shutil.copytree(finished, original)
    with open(copy / 'last_checkpoint', 'w') as f:
        f.write(str(original / 'iter_2.pth'))
    with open(original / 'iter_2.pth', 'wb') as f:
        f.write(b'not a checkpoint')
    runner = train(copy, max_iters=4, resume=True)
    assert runner.iter == 4


def test_last_checkpoint_naming_a_missing_file(tmp_path):
    with open(tmp_path / 'last_checkpoint', 'w') as f:
        f.write('/elsewhere/iter_9.pth')
    with pytest.raises(FileNotFoundError) as err:
        resolve_last_checkpoint(str(tmp_path))
    # the record, the file it names, the copy looked for, the way out
    assert_mentions(err, str(tmp_path / 'last_checkpoint'),
                    '/elsewhere/iter_9.pth', str(tmp_path / 'iter_9.pth'),
                    '--resume PATH')
    with open(tmp_path / 'last_checkpoint', 'w') as f:
        f.write('iter_9.pth')  # relative: taken in the work dir
    (tmp_path / 'iter_9.pth').write_bytes(b'')
    assert resolve_last_checkpoint(str(tmp_path)) == str(
        tmp_path / 'iter_9.pth')


HOLDER = '''
import sys, time
from mmpfc.engine.runners.work_dir import WorkDirLock
lock = WorkDirLock(sys.argv[1]).acquire()
print('locked', flush=True)
time.sleep(600)
'''


def hold_lock(work_dir):
    """Another process training in ``work_dir`` (as far as the lock
    goes); returns it once it holds the lock."""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, '-c', HOLDER, str(work_dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'locked'
    return proc


@pytest.mark.parametrize('resume', [False, True])
def test_second_run_in_a_live_work_dir_is_refused(tmp_path, resume):
    import signal
    import socket
    import time

    from mmpfc.engine.runners.work_dir import WorkDirLockedError
    holder = hold_lock(tmp_path)
    try:
        cfg = make_cfg(str(tmp_path), max_iters=2, resume=resume)
        runner = build_runner(cfg)
        start = time.monotonic()
        with pytest.raises(WorkDirLockedError) as info:
            runner.train()
        assert time.monotonic() - start < 5
        message = str(info.value)
        assert f'PID {holder.pid} on host {socket.gethostname()}' in message
        assert '--work-dir' in message and '.mmpfc-train.lock' in message
        assert runner.iter == 0 and not existing_checkpoints([tmp_path])
        # the holder killed without a chance to clean up: its lock goes
        # with it, and a new run starts without any manual step
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        train(tmp_path, max_iters=2)
        assert osp.isfile(osp.join(tmp_path, 'iter_2.pth'))
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_lock_is_released_when_the_run_ends(tmp_path):
    from mmpfc.engine.runners.work_dir import WorkDirLock
    train(tmp_path, max_iters=2)
    # the finished run holds nothing: the lock can be taken again
    with WorkDirLock(str(tmp_path)) as lock:
        assert lock.supported
        with open(lock.path) as f:
            assert f'"pid": {os.getpid()}' in f.read()


def _train_expecting_lock_error(rank, world_size, work_dir):
    from mmpfc.engine.runners.work_dir import WorkDirLockedError
    runner = build_runner(make_cfg(work_dir, world_size=world_size,
                                   max_iters=2))
    try:
        runner.train()
    except WorkDirLockedError as err:
        return str(err)
    return None


def test_every_rank_refuses_a_live_work_dir(tmp_path):
    """Rank 0 holds the lock for the run; the others must raise too
    instead of waiting for it in the first collective."""
    from dist_utils import run_distributed
    holder = hold_lock(tmp_path)
    try:
        messages = run_distributed(_train_expecting_lock_error, 2,
                                   str(tmp_path), timeout=120)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert messages[0] == messages[1]
    assert f'PID {holder.pid}' in messages[1]


# ----------------------- which run a start continues (restarts, requeues)
@HOOKS.register_module(force=True)
class _DieBeforeTraining(Hook):
    """A start that dies before its first save (a rank lost, a kill)."""

    def before_train(self, runner):
        raise RuntimeError('died before the first save')


def test_auto_resume_without_a_checkpoint_starts_from_load_from(
        finished, tmp_path):
    """``--resume`` on a first start (a Slurm job requeued with the same
    command) of a fine-tune: the config's load_from, not random weights."""
    pretrained = str(finished / 'iter_2.pth')
    runner = train(tmp_path, max_iters=2, resume='auto',
                   load_from=pretrained)
    assert runner.captured['iter'] == 0  # started, not resumed
    reference = build_runner(make_cfg(str(tmp_path / 'ref'), max_iters=2,
                                      load_from=pretrained))
    reference.train()  # the same fine-tune without --resume
    assert torch.equal(runner.captured['weight'],
                       reference.captured['weight'])
    again = train(tmp_path, max_iters=4, resume='auto', load_from=pretrained)
    assert again.captured['iter'] == 2  # its own checkpoint now


def test_overwrite_forgets_the_old_runs_last_checkpoint(finished, tmp_path):
    work_dir = tmp_path / 'copy'
    shutil.copytree(finished, work_dir)
    with pytest.raises(RuntimeError, match='first save'):
        train(work_dir, overwrite=True, extra_hooks=['_DieBeforeTraining'])
    # a requeue with --resume must not continue the replaced run
    assert resolve_last_checkpoint(str(work_dir)) is None


def test_restart_of_another_launch_is_judged_as_its_first_attempt(
        finished, tmp_path, monkeypatch):
    """A fresh run refused in a used work dir, restarted by torchrun, is
    refused again instead of resuming the other run's checkpoints."""
    work_dir = tmp_path / 'run'
    shutil.copytree(finished, work_dir)
    (work_dir / LAUNCH_FILE).write_text('another launch')
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    with pytest.raises(WorkDirInUseError):
        train(work_dir, max_iters=4)


def test_resuming_another_folders_checkpoint_into_a_used_dir(
        finished, tmp_path):
    used = tmp_path / 'used'
    shutil.copytree(finished, used)
    other = tmp_path / 'other'
    shutil.copytree(finished, other)
    before = snapshot(used)
    with pytest.raises(WorkDirInUseError) as err:
        train(used, max_iters=4, resume=True,
              load_from=str(other / 'iter_2.pth'))
    assert_mentions(err, str(other / 'iter_2.pth'), '--work-dir',
                    '--overwrite')
    assert snapshot(used) == before
    # into a fresh dir it is fine, and last_checkpoint names it at once
    fresh = tmp_path / 'fresh'
    with pytest.raises(RuntimeError, match='first save'):
        train(fresh, max_iters=4, resume=True,
              load_from=str(other / 'iter_2.pth'),
              extra_hooks=['_DieBeforeTraining'])
    assert resolve_last_checkpoint(str(fresh)) == str(other / 'iter_2.pth')


def test_last_checkpoint_relative_to_the_current_directory(tmp_path,
                                                           monkeypatch):
    """MMEngine writes a relative ``out_dir``'s checkpoint as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'ckpts' / 'run').mkdir(parents=True)
    (tmp_path / 'ckpts' / 'run' / 'iter_2.pth').write_bytes(b'')
    work_dir = tmp_path / 'work' / 'run'
    work_dir.mkdir(parents=True)
    (work_dir / 'last_checkpoint').write_text('ckpts/run/iter_2.pth')
    assert resolve_last_checkpoint(str(work_dir)) == str(
        tmp_path / 'ckpts' / 'run' / 'iter_2.pth')


def test_restart_of_a_fine_tune_before_its_first_save(finished, tmp_path,
                                                      monkeypatch):
    """``--resume`` with a config's load_from, restarted by torchrun before
    its first save: it starts as its first attempt did (initialized from
    load_from), not resumed from the pretrained file as a checkpoint."""
    pretrained = str(finished / 'iter_2.pth')
    with pytest.raises(RuntimeError, match='first save'):
        train(tmp_path, resume='auto', load_from=pretrained,
              extra_hooks=['_DieBeforeTraining'])
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '1')
    runner = train(tmp_path, max_iters=2, resume='auto', load_from=pretrained)
    assert runner.captured['iter'] == 0 and runner.iter == 2


def test_a_wrong_resume_path_keeps_last_checkpoint(finished, tmp_path):
    work_dir = tmp_path / 'run'
    shutil.copytree(finished, work_dir)
    with pytest.raises(Exception):
        train(work_dir, max_iters=4, resume=True,
              load_from=str(work_dir / 'iter_2000.pth'))  # a typo
    assert resolve_last_checkpoint(str(work_dir)) == str(
        work_dir / 'iter_2.pth')


def test_launch_identity_is_the_launch_not_the_attempt(monkeypatch):
    from mmpfc.engine.runners.work_dir import launch_identity
    monkeypatch.delenv('TORCHELASTIC_RUN_ID', raising=False)
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE',
                       '/tmp/torchelastic_ab/none_cd/attempt_0/0/error.json')
    first = launch_identity()
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE',
                       '/tmp/torchelastic_ab/none_cd/attempt_1/0/error.json')
    assert launch_identity() == first  # a restart, wrapped or not
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE',
                       '/tmp/torchelastic_xy/none_cd/attempt_0/0/error.json')
    assert launch_identity() != first  # another launch
    # a fixed --rdzv-id repeats across launches: not enough alone
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job-42')
    again = launch_identity()
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE',
                       '/tmp/torchelastic_ab/none_cd/attempt_0/0/error.json')
    assert launch_identity() != again
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE',  # a --log-dir .../attempt_1
                       '/logs/attempt_1/none_cd/attempt_0/0/error.json')
    other = launch_identity()
    monkeypatch.setenv('TORCHELASTIC_ERROR_FILE',
                       '/logs/attempt_2/none_cd/attempt_0/0/error.json')
    assert launch_identity() != other


def test_a_failure_preparing_the_work_dir_is_raised(tmp_path, monkeypatch):
    """Rank 0 prepares the work dir before the other ranks hear its plan;
    an error there is raised (on every rank: they get it in the plan)."""
    from mmpfc.engine.runners import PartialFCRunner

    def full_disk(self):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(PartialFCRunner, '_start_plan', full_disk)
    with pytest.raises(OSError, match='No space left'):
        train(tmp_path)
