"""TrainingHealthHook and the runner's refusal to save non-finite weights.

A run whose weights turn NaN must stop on every rank before a checkpoint of
them is written, and must leave the good checkpoints and ``last_checkpoint``
as they were.
"""
import math
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from dist_utils import run_distributed
from messages import assert_mentions
from mmengine.hooks import Hook
from mmengine.logging import MessageHub, MMLogger
from tiny_training import build_runner, make_cfg

import mmpfc  # noqa: F401
from mmpfc.engine.hooks import TrainingDivergedError, TrainingHealthHook
from mmpfc.registry import HOOKS


@HOOKS.register_module(force=True)
class PoisonHook(Hook):
    """Writes NaN into a parameter of ``ranks`` at a chosen point.

    ``when='before_iter'``: into the backbone before iteration ``at`` (the
    loss of that iteration is NaN); ``when='before_save'``: into the head's
    shard after iteration ``at``, after the health check and before
    ``CheckpointHook`` (the loss stays finite, the saved weights would not).
    """

    priority = 'LOW'

    def __init__(self, at, when='before_iter', ranks=(0, 1)):
        self.at, self.when, self.ranks = at, when, tuple(ranks)

    def _model(self, runner):
        return getattr(runner.model, 'module', runner.model)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        if self.when == 'before_iter' and runner.iter == self.at and \
                runner.rank in self.ranks:
            with torch.no_grad():
                next(self._model(runner).backbone.parameters()).fill_(
                    float('nan'))

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if self.when == 'before_save' and runner.iter + 1 == self.at and \
                runner.rank in self.ranks:
            with torch.no_grad():
                self._model(runner).head.weight[0, 0] = float('inf')


def run_until_error(rank, world_size, work_dir, poison, health):
    hooks = [dict(type='PoisonHook', **poison)]
    if health:
        hooks.append(dict(type='TrainingHealthHook'))
    cfg = make_cfg(work_dir, world_size=world_size, max_iters=8,
                   interval=2, max_keep_ckpts=2)
    cfg.custom_hooks = cfg.custom_hooks + hooks
    runner = build_runner(cfg)
    try:
        runner.train()
    except TrainingDivergedError as err:
        return str(err)
    return None


def last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        return osp.basename(f.read().strip())


def assert_finite_checkpoint(path):
    state = torch.load(path, map_location='cpu', weights_only=False)
    for name, value in state['state_dict'].items():
        assert torch.isfinite(value).all(), name


def test_nan_loss_stops_before_its_checkpoint(tmp_path):
    """NaN from iteration 5 on: stop there; iter_2/iter_4 stay, iter_4 is
    last_checkpoint, nothing later is written or rotated out."""
    work_dir = str(tmp_path)
    message = run_until_error(0, 1, work_dir, dict(at=4), health=True)
    assert message is not None and 'iteration 5' in message
    assert 'weights are not finite' in message
    assert 'learning rate' in message  # the likely causes
    assert osp.isfile(osp.join(work_dir, 'iter_2.pth'))
    assert osp.isfile(osp.join(work_dir, 'iter_4.pth'))
    assert not osp.exists(osp.join(work_dir, 'iter_6.pth'))
    assert last_checkpoint(work_dir) == 'iter_4.pth'
    assert_finite_checkpoint(osp.join(work_dir, 'iter_4.pth'))


def test_every_rank_stops_when_one_rank_is_bad(tmp_path):
    """NaN in rank 1's backbone replica only: both ranks stop at the same
    iteration with the same step named."""
    messages = run_distributed(run_until_error, 2, str(tmp_path),
                               dict(at=2, ranks=(1,)), True)
    assert all(m is not None and 'iteration 3' in m for m in messages)
    assert last_checkpoint(str(tmp_path)) == 'iter_2.pth'
    assert not osp.exists(osp.join(str(tmp_path), 'iter_4.pth'))


def test_save_refuses_non_finite_shard_of_another_rank(tmp_path):
    """No health hook: an inf in rank 1's shard only, with a finite loss.
    The save at iteration 4 is refused on both ranks; last_checkpoint still
    names iter_2."""
    messages = run_distributed(run_until_error, 2, str(tmp_path),
                               dict(at=4, when='before_save', ranks=(1,)),
                               False)
    assert 'refusing to save' in messages[0] and 'another rank' in messages[0]
    assert 'refusing to save' in messages[1] and 'head.weight' in messages[1]
    assert not osp.exists(osp.join(str(tmp_path), 'iter_4.pth'))
    assert last_checkpoint(str(tmp_path)) == 'iter_2.pth'


# ------------------------------------------- the hook on a stand-in runner
class StandInRunner(SimpleNamespace):
    """What the hook reads of a runner: model, iter, message hub, logger."""


def stand_in(loss_scale=None, grad_norm=None):
    hub = MessageHub(f'health-{id(object())}')
    if loss_scale is not None:
        hub.update_scalar('train/loss_scale', loss_scale)
    if grad_norm is not None:
        hub.update_scalar('train/grad_norm', grad_norm)
    logger = MMLogger(f'health-{id(hub)}', log_level='WARNING')
    return StandInRunner(model=torch.nn.Linear(2, 2), iter=0,
                         message_hub=hub, logger=logger)


def step(hook, runner, loss):
    hook.after_train_iter(runner, runner.iter,
                          outputs=dict(loss=torch.tensor(loss)))
    runner.iter += 1


def test_patience_counts_consecutive_non_finite_losses():
    hook, runner = TrainingHealthHook(patience=2), stand_in()
    step(hook, runner, math.nan)          # 1st non-finite: tolerated
    step(hook, runner, 1.0)               # finite: the count restarts
    step(hook, runner, math.inf)          # 1st again
    with pytest.raises(TrainingDivergedError,
                       match=r'iteration 4.*2 consecutive.*patience=2'):
        step(hook, runner, math.nan)


def test_warn_goes_on_while_the_weights_are_finite(caplog):
    hook, runner = TrainingHealthHook(action='warn'), stand_in()
    for _ in range(3):
        step(hook, runner, math.nan)
    assert hook.bad_iters == 3
    with torch.no_grad():
        runner.model.weight[0, 0] = math.nan
    with pytest.raises(TrainingDivergedError, match=r"\['weight'\]"):
        step(hook, runner, math.nan)  # NaN weights stop even with 'warn'


def test_non_finite_gradient_norm_counts():
    hook, runner = TrainingHealthHook(), stand_in(grad_norm=math.inf)
    with pytest.raises(TrainingDivergedError, match='gradient norm inf'):
        step(hook, runner, 1.0)


def test_collapsed_loss_scale_is_reported():
    TrainingHealthHook(min_loss_scale=1e-4).after_train_iter(
        stand_in(loss_scale=2.0**-10), 0, outputs=dict(loss=1.0))
    with pytest.raises(TrainingDivergedError,
                       match=r'loss scale fell to 6.10352e-05 at iteration 1'):
        TrainingHealthHook(min_loss_scale=1e-4).after_train_iter(
            stand_in(loss_scale=2.0**-14), 0, outputs=dict(loss=1.0))


@pytest.mark.parametrize('kwargs, named', [
    (dict(patience=0), ('patience', '>= 1', 'got 0')),
    (dict(action='ignore'), ('action', "['stop', 'warn']", "got 'ignore'")),
    (dict(min_loss_scale=0.0), ('min_loss_scale', '> 0', 'got 0.0')),
])
def test_bad_arguments(kwargs, named):
    with pytest.raises(ValueError) as err:
        TrainingHealthHook(**kwargs)
    assert_mentions(err, 'TrainingHealthHook', *named)
