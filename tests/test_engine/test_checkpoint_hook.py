"""The mmpfc scope's CheckpointHook: a checkpoint that max_keep_ckpts
rotates out, or a best checkpoint being replaced, is deleted only once the
new one is saved, so a save that dies leaves the previous ones."""
import logging
import os.path as osp
from types import SimpleNamespace

import pytest
from mmengine.logging import MessageHub
from mmengine.registry import init_default_scope

import mmpfc  # noqa: F401
from mmpfc.engine.hooks import CheckpointHook
from mmpfc.registry import HOOKS


class _SaveDied(Exception):
    pass


def _runner(work_dir, die_at=()):
    """What the hook uses of a runner; its saves write a file, except the
    saves numbered in ``die_at`` (1-based), which raise first."""
    saves = []

    def save_checkpoint(out_dir, filename, *args, **kwargs):
        saves.append((filename, sorted(p.name for p in work_dir.iterdir()
                                       if p.suffix == '.pth')))
        if len(saves) in die_at:
            raise _SaveDied(filename)
        with open(osp.join(out_dir, filename), 'w') as f:
            f.write(filename)
    hub = MessageHub.get_instance(f'ckpt-hook-{work_dir}')
    return SimpleNamespace(work_dir=str(work_dir), message_hub=hub,
                           save_checkpoint=save_checkpoint, iter=0, epoch=0,
                           logger=logging.getLogger('ckpt-hook-test'),
                           saves=saves, rank=0, world_size=1)


def _hook(runner, **kwargs):
    init_default_scope('mmpfc')
    hook = HOOKS.build(dict(type='CheckpointHook', by_epoch=False,
                            interval=1, **kwargs))
    assert isinstance(hook, CheckpointHook)
    hook.before_train(runner)
    return hook


def _step(hook, runner, iteration):
    runner.iter = iteration - 1  # after_train_iter sees the finished one
    hook.after_train_iter(runner, batch_idx=iteration - 1)


def test_rotated_out_checkpoint_is_deleted_after_the_new_save(tmp_path):
    runner = _runner(tmp_path)
    hook = _hook(runner, max_keep_ckpts=1)
    _step(hook, runner, 1)
    _step(hook, runner, 2)
    # iter_1 was still there while iter_2 was written (MMEngine's hook
    # deletes it first), and is gone once iter_2 is last_checkpoint
    assert runner.saves == [('iter_1.pth', []),
                            ('iter_2.pth', ['iter_1.pth'])]
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_2.pth']
    assert (tmp_path / 'last_checkpoint').read_text().endswith('iter_2.pth')


def test_rotated_out_checkpoint_survives_a_save_that_dies(tmp_path):
    runner = _runner(tmp_path, die_at=(2, ))
    hook = _hook(runner, max_keep_ckpts=1)
    _step(hook, runner, 1)
    with pytest.raises(_SaveDied):
        _step(hook, runner, 2)
    assert (tmp_path / 'iter_1.pth').is_file()
    assert (tmp_path / 'last_checkpoint').read_text().endswith('iter_1.pth')


def _validate(hook, runner, iteration, acc):
    runner.iter = iteration  # validation after that iteration
    hook.after_val_epoch(runner, dict(acc=acc))


def test_previous_best_is_deleted_after_the_new_one_is_saved(tmp_path):
    runner = _runner(tmp_path)
    hook = _hook(runner, save_best='acc', rule='greater')
    _step(hook, runner, 1)  # save 1: iter_1.pth
    _validate(hook, runner, 1, 0.5)  # saves 2, 3: best, iter_1 again
    _step(hook, runner, 2)  # save 4
    _validate(hook, runner, 2, 0.9)  # save 5: the new best
    assert runner.saves[4] == ('best_acc_iter_2.pth', [
        'best_acc_iter_1.pth', 'iter_1.pth', 'iter_2.pth'])
    assert not (tmp_path / 'best_acc_iter_1.pth').exists()
    assert (tmp_path / 'best_acc_iter_2.pth').is_file()


def test_previous_best_survives_a_save_that_dies(tmp_path):
    runner = _runner(tmp_path, die_at=(5, ))
    hook = _hook(runner, save_best='acc', rule='greater')
    _step(hook, runner, 1)
    _validate(hook, runner, 1, 0.5)
    _step(hook, runner, 2)
    with pytest.raises(_SaveDied):
        _validate(hook, runner, 2, 0.9)
    assert (tmp_path / 'best_acc_iter_1.pth').is_file()


@pytest.mark.parametrize('copied', [False, True])
def test_another_folders_best_checkpoint_is_never_deleted(tmp_path, copied):
    """A run resumed from another run's checkpoint inherits its message
    hub, whose best checkpoint lies in that run's folder: beating its score
    must not delete it. A copied work dir's own copy of it is its own."""
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'best_acc_iter_1.pth').write_text('the other run')
    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    if copied:
        (work_dir / 'best_acc_iter_1.pth').write_text('the copy')
    runner = _runner(work_dir)
    runner.message_hub.update_info('best_ckpt',
                                   str(other / 'best_acc_iter_1.pth'))
    runner.message_hub.update_info('best_score', 0.5)
    hook = _hook(runner, save_best='acc', rule='greater')
    _step(hook, runner, 2)
    _validate(hook, runner, 2, 0.9)
    assert (work_dir / 'best_acc_iter_2.pth').is_file()
    assert (other / 'best_acc_iter_1.pth').read_text() == 'the other run'
    assert not (work_dir / 'best_acc_iter_1.pth').exists()
