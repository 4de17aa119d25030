"""A work dir's checkpoints: never overwritten by a new run unless asked,
``last_checkpoint`` resolved in the dir itself, a finished run left alone."""
import os
import os.path as osp
import shutil

import pytest
from tiny_training import build_runner, make_cfg

import mmpfc  # noqa: F401
from mmpfc.engine.runners.work_dir import (WorkDirInUseError,
                                           resolve_last_checkpoint)


def train(work_dir, max_iters=2, overwrite=False, **kwargs):
    cfg = make_cfg(str(work_dir), max_iters=max_iters, interval=2, **kwargs)
    cfg.overwrite = overwrite
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
    assert _logged(runner, 'is complete: it was resumed at iteration 2 of '
                   'max_iters=2')


def _logged(runner, text):
    for handler in runner.logger.handlers:
        path = getattr(handler, 'baseFilename', None)
        if path and osp.isfile(path):
            with open(path) as f:
                if text in f.read():
                    return True
    return False


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
    with pytest.raises(FileNotFoundError,
                       match=r'names /elsewhere/iter_9.pth.*--resume PATH'):
        resolve_last_checkpoint(str(tmp_path))
    with open(tmp_path / 'last_checkpoint', 'w') as f:
        f.write('iter_9.pth')  # relative: taken in the work dir
    (tmp_path / 'iter_9.pth').write_bytes(b'')
    assert resolve_last_checkpoint(str(tmp_path)) == str(
        tmp_path / 'iter_9.pth')
