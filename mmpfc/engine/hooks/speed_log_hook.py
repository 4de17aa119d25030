"""The reference's throughput line, through MMEngine's logger."""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from mmengine.hooks import Hook, LoggerHook
from mmengine.runner import EpochBasedTrainLoop

from mmpfc.registry import HOOKS
from mmpfc.utils.arg_checks import Int, Opt, arg_specs

SPEED_LINE = ('Training: Speed {speed:.2f} samples/sec   Loss {loss:.4f}   '
              'LearningRate {lr}   Epoch: {epoch:d}   Global Step: {step:d}')


def format_lr(lr: float) -> str:
    """A learning rate readable at any magnitude: ``%.4f`` inside
    [1e-4, 1e4] (and for 0), ``%.4e`` outside, e.g. ``0.2000``,
    ``2.0000e-05``, ``0.0000``.
    """
    if lr == 0 or 1e-4 <= abs(lr) <= 1e4:
        return f'{lr:.4f}'
    return f'{lr:.4e}'


def format_speed_line(speed: float, loss: float, lr: float, epoch: int,
                      step: int, loss_scale: Optional[float] = None,
                      required_hours: Optional[float] = None) -> str:
    """The insightface ``arcface_torch`` log line (three spaces between
    fields)::

        Training: Speed 5299.56 samples/sec   Loss 1.0965   LearningRate 0.2000
          Epoch: 0   Global Step: 100   Fp16 Grad Scale: 65536
          Required: 1 hours

    (one line, wrapped here)

    ``LearningRate`` goes through :func:`format_lr` (readable below 1e-4,
    where ``%.4f`` shows 0). As in the reference's newer versions,
    ``Fp16 Grad Scale: %2.f`` (the loss scale, only with a loss scaler)
    follows ``Global Step`` and ``Required: %1.f hours`` (the estimated time
    left, rounded to whole hours) comes last; each is left out when
    ``None``.
    """
    line = SPEED_LINE.format(speed=speed, loss=loss, lr=format_lr(lr),
                             epoch=epoch, step=step)
    if loss_scale is not None:
        line += '   Fp16 Grad Scale: %2.f' % loss_scale
    if required_hours is not None:
        line += '   Required: %1.f hours' % required_hours
    return line


def hours_left(seconds: float, steps_done: int, steps_left: int) -> float:
    """Hours the ``steps_left`` iterations take at the average pace of the
    ``steps_done`` ones that took ``seconds`` (0 before any step is done).
    """
    if steps_done <= 0:
        return 0.0
    return seconds / steps_done * max(steps_left, 0) / 3600


def loss_scale_of(runner) -> Optional[float]:
    """The loss scale of the last iteration (``train/loss_scale`` in the
    message hub) when the optim wrapper has a loss scaler, else ``None``.
    """
    if getattr(runner.optim_wrapper, 'loss_scaler', None) is None:
        return None
    scalars = runner.message_hub.log_scalars
    if 'train/loss_scale' not in scalars:
        return None
    return float(scalars['train/loss_scale'].current())


def logger_interval(runner, default: int = 50) -> int:
    """The ``interval`` of the runner's ``LoggerHook`` (or ``default``)."""
    for hook in runner.hooks:
        if isinstance(hook, LoggerHook):
            return hook.interval
    return default


@HOOKS.register_module()
@arg_specs(interval=Opt(Int(low=1)))
class SpeedLogHook(Hook):
    """Every ``interval`` iterations rank 0 logs the reference's speed line::

        Training: Speed 5299.56 samples/sec   Loss 1.0965   LearningRate 0.2000
            Epoch: 0   Global Step: 100   Required: 1 hours

    (one line, wrapped here)

    * Speed = iterations since the last line x per-rank batch x world size /
      wall seconds since the last line (on rank 0; the first interval
      counts from the start of training, data loader start-up included);
    * Loss = mean of the iterations' losses (rank 0's; a sharded head's loss
      is the global one, the same on every rank);
    * LearningRate = the first parameter group's lr of the last iteration
      (``%.4f`` inside [1e-4, 1e4], else ``%.4e``, e.g. ``2.0000e-05``);
    * Epoch = completed passes over the dataset (``samples seen //
      len(dataset)``; ``runner.epoch`` with an epoch-based loop);
    * Global Step = iterations done;
    * Fp16 Grad Scale (only with a loss scaler, i.e. fp16) = the loss scale
      of the last iteration (``train/loss_scale``);
    * Required = hours left: the remaining iterations of the train loop's
      ``max_iters`` at the average seconds per iteration of this run so far
      (from ``before_train``, so a resumed run measures its own pace).

    It goes through ``runner.logger`` (console and log file) and updates the
    scalar ``train/speed`` in the message hub, so MMEngine's own line (with
    eta and the fp16 loss scale), the JSON log and TensorBoard get it too.
    Its priority (``NORMAL``) runs it before ``LoggerHook``, so both see the
    same values at the same iteration.

    Example::

        custom_hooks = [dict(type='SpeedLogHook')]  # LoggerHook's interval

    Args:
        interval: Iterations between lines; ``None`` uses the ``LoggerHook``
            interval.
    """

    priority = 'NORMAL'

    def __init__(self, interval: Optional[int] = None) -> None:
        self.interval = interval
        self.clock = time.perf_counter  # replaceable in tests

    def before_train(self, runner) -> None:
        if self.interval is None:
            self.interval = logger_interval(runner)
        dataloader = runner.train_dataloader
        self.batch_size = dataloader.batch_size or getattr(
            dataloader.batch_sampler, 'batch_size', None)
        if not self.batch_size:
            raise ValueError(
                'SpeedLogHook needs the per-rank batch size: the train '
                'dataloader has neither batch_size nor a batch_sampler with '
                'one')
        try:
            self.dataset_size = len(dataloader.dataset)
        except TypeError:  # an iterable dataset
            self.dataset_size = None
        self._last_step = self._start_step = runner.iter
        self._loss_sum, self._loss_count = 0.0, 0
        self._tic = self._start = self.clock()

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Sequence] = None,
                         outputs: Optional[dict] = None) -> None:
        if outputs and 'loss' in outputs:
            loss = outputs['loss']
            self._loss_sum += float(loss.item() if isinstance(
                loss, torch.Tensor) else loss)
            self._loss_count += 1
        if not self.every_n_train_iters(runner, self.interval):
            return
        step = runner.iter + 1
        now = self.clock()
        seconds = now - self._tic
        samples = (step - self._last_step) * self.batch_size * \
            runner.world_size
        speed = samples / seconds if seconds > 0 else float('inf')
        loss = self._loss_sum / max(self._loss_count, 1)
        lr = runner.message_hub.get_scalar('train/lr').current() \
            if 'train/lr' in runner.message_hub.log_scalars else float('nan')
        runner.message_hub.update_scalar('train/speed', speed)
        if runner.rank == 0:
            hours = hours_left(now - self._start,
                               step - self._start_step,
                               runner.max_iters - step)
            runner.logger.info(format_speed_line(
                speed, loss, lr, self.epoch(runner, step), step,
                loss_scale=loss_scale_of(runner), required_hours=hours))
        self._last_step = step
        self._loss_sum, self._loss_count = 0.0, 0
        self._tic = self.clock()

    def epoch(self, runner, step: int) -> int:
        """Completed passes over the training set after ``step`` iterations."""
        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            return runner.epoch
        if not self.dataset_size:
            return 0
        return step * self.batch_size * runner.world_size // \
            self.dataset_size
