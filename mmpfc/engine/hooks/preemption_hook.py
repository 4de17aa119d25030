"""Save and stop when the scheduler says the job must go.

Slurm and Kubernetes send SIGTERM before they kill a job (Slurm also
SIGUSR1 ahead of a time limit, with ``--signal=USR1@SECONDS``). Without a
handler the run dies and everything since the last checkpoint interval is
lost. With this hook every rank finishes the iteration in flight, the ranks
agree on one last iteration (the signal may reach them at different steps),
save one ordinary sharded checkpoint of it, and the run ends with
:class:`TrainingPreempted`, which ``tools/train.py`` turns into exit status
:data:`PREEMPTED_EXIT_CODE` ("preempted: resume me").

A signal only sets a flag: a save in progress is never interrupted. A
second signal kills the process at once (the previous complete checkpoint
stays valid: saves are atomic); one within ``repeat_window`` seconds of the
first counts as the same request (Slurm signals every process of a job,
and torchrun forwards the signal it got to its workers once more). An
agreement that does not come within ``agreement_timeout`` seconds (a peer
already gone) ends the run without a new checkpoint.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import os.path as osp
import signal
import threading
import time
import weakref
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist
from mmengine.hooks import CheckpointHook, Hook

from mmpfc.registry import HOOKS
from mmpfc.utils.arg_checks import OneOf, Real, Seq, arg_specs

#: Signals a scheduler may send ahead of a kill, by name.
CATCHABLE_SIGNALS = ('SIGTERM', 'SIGUSR1', 'SIGUSR2', 'SIGINT', 'SIGHUP')
#: sysexits' EX_TEMPFAIL: a temporary failure, the job should be retried.
PREEMPTED_EXIT_CODE = 75


#: Environment variable naming a file to create when a run stops on a
#: preemption signal (tools/slurm_train.sh reads it: srun's own status may
#: be the signal of ranks it killed after the first one exited with 75).
PREEMPTED_FILE_ENV = 'MMPFC_PREEMPTED_FILE'


def mark_preempted(logger=None) -> None:
    """Create the file :data:`PREEMPTED_FILE_ENV` names, if any, at once
    (before the loader's workers are joined, which may outlast the
    scheduler's patience); a folder that cannot take it is only logged."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if not path:
        return
    try:
        with open(path, 'a'):
            pass
    except OSError as err:
        if logger is not None:
            logger.warning(f'could not create {PREEMPTED_FILE_ENV}={path} '
                           f'({err}): the job script will not know this '
                           'stop was a preemption')


class TrainingPreempted(Exception):
    """The run stopped on a signal; ``checkpoint`` is the checkpoint to
    resume from; ``agreed``: every rank stopped at this iteration (False
    when the others did not answer: nothing new was saved, and a collective
    would wait for them forever)."""

    def __init__(self, message: str, checkpoint: Optional[str],
                 agreed: bool = True) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.agreed = agreed


class WorkerSignals:
    """A loader's ``worker_init_fn`` that first makes its worker ignore
    ``signals`` while training goes on.

    A worker is forked with its process's handlers, but PyTorch gives it a
    SIGTERM handler that exits, and a worker that dies makes the training
    process raise at once, before it can save. When the training process
    exits it terminates its workers with SIGTERM and waits for them: from
    then on (an event set at its exit, or when the loader holding this
    function is gone) the signal ends a worker again.
    """

    def __init__(self, signals: Sequence[int], inner=None) -> None:
        self.signals, self.inner = list(signals), inner
        self.parent_exiting = multiprocessing.Event()
        # called at the process's exit, unless the loader went first: no
        # exit handler outlives its loader
        weakref.finalize(self, self.parent_exiting.set)

    def __call__(self, worker_id: int) -> None:
        for number in self.signals:
            signal.signal(number, self._on_signal)
        if self.inner is not None:
            self.inner(worker_id)

    def _on_signal(self, number: int, frame) -> None:
        if self.parent_exiting.is_set():
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)


@HOOKS.register_module()
@arg_specs(signals=Seq(OneOf(*CATCHABLE_SIGNALS)),
           agreement_timeout=Real(low=0, low_open=True),
           repeat_window=Real(low=0, low_open=True))
class PreemptionHook(Hook):
    """Save a checkpoint of the current iteration on SIGTERM / SIGUSR1.

    Args:
        signals: names of the signals that ask for a save and a stop.
        agreement_timeout: seconds a rank that got the signal waits for the
            others to agree before it exits without saving.
        repeat_window: seconds after the first signal during which another
            one is the same request; a later one kills the process.

    The handlers are installed by ``PartialFCRunner.train`` and removed
    when training ends; the runner's data loaders' workers ignore the
    signals (:class:`WorkerSignals`), so one sent to the whole job does not
    kill them.
    Agreement costs one all-reduce of 4 bytes per iteration, on a CPU
    (gloo) group: no host-device synchronization.
    """

    priority = 'LOWEST'  # after CheckpointHook has saved this iteration

    def __init__(self, signals: Sequence[str] = ('SIGTERM', 'SIGUSR1'),
                 agreement_timeout: float = 60.0,
                 repeat_window: float = 2.0) -> None:
        self.signals = [int(getattr(signal, name)) for name in signals]
        self.agreement_timeout = float(agreement_timeout)
        self.repeat_window = float(repeat_window)
        self.received: Optional[int] = None
        self._received_at = 0.0
        self._previous: Dict[int, object] = {}
        self._checkpoint_hook: Optional[CheckpointHook] = None
        self._group = None

    # ------------------------------------------------------- the handlers
    def install_signal_handlers(self) -> bool:
        """Catch :attr:`signals` (main thread only); False where signal
        handlers cannot be set."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self.received = None
        for number in self.signals:
            self._previous[number] = signal.signal(number, self._on_signal)
        return True

    def restore_signal_handlers(self) -> None:
        """Put back the handlers found at install time."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _on_signal(self, number: int, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._received_at = number, now
        elif now - self._received_at > self.repeat_window:
            # asked again: go now, the last complete checkpoint stays
            self.restore_signal_handlers()
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)

    # -------------------------------------------------------------- hooks
    def before_train(self, runner) -> None:
        """The CheckpointHook that will save a preempted iteration, looked
        up before training (a run without one is told now that a signal
        will stop it unsaved); the CPU group the ranks agree over (every
        rank calls it)."""
        hooks = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
        self._checkpoint_hook = hooks[0] if hooks else None
        if not hooks:
            runner.logger.warning(
                'PreemptionHook without a CheckpointHook (default_hooks.'
                'checkpoint): a signal will stop the run with an error and '
                'nothing saved; add the CheckpointHook, or set '
                'default_hooks.preemption=None')
        if any(h.by_epoch for h in hooks):
            raise ValueError(
                'PreemptionHook saves the iteration in flight, but default_'
                'hooks.checkpoint has by_epoch=True (epoch checkpoints '
                'cannot hold part of an epoch): set by_epoch=False, or '
                'default_hooks.preemption=None')
        self._group = None
        if dist.is_available() and dist.is_initialized() and \
                dist.get_world_size() > 1 and \
                dist.get_backend() != dist.Backend.GLOO:
            self._group = dist.new_group(backend='gloo')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        if not self._agreed_to_stop(runner):
            return
        if runner.iter + 1 >= runner.max_iters:
            return  # the last iteration: the run ends (and saves) anyway
        name = signal.Signals(self.received).name \
            if self.received else 'a signal on another rank'
        path = self._save(runner)
        self.restore_signal_handlers()
        runner.logger.warning(
            f'Preempted ({name}): saved {path} at iteration '
            f'{runner.iter + 1}; resume with --resume in {runner.work_dir}')
        mark_preempted(runner.logger)
        raise TrainingPreempted(
            f'preempted by {name} at iteration {runner.iter + 1}; resume '
            f'from {path} with --resume', path)

    def after_train(self, runner) -> None:
        self.restore_signal_handlers()

    # ------------------------------------------------------------ helpers
    def _agreed_to_stop(self, runner) -> bool:
        """Whether any rank got a signal by this iteration (a collective)."""
        if not (dist.is_available() and dist.is_initialized()) or \
                dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)],
                            dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX,
                               group=self._group, async_op=True)
        if self.received is None:
            work.wait()
            return bool(flag.item())
        try:
            work.wait(datetime.timedelta(seconds=self.agreement_timeout))
        except RuntimeError:  # a peer is gone: leave without saving
            self.restore_signal_handlers()
            last = runner.message_hub.get_info('last_ckpt')
            runner.logger.error(
                f'Preempted, but the other ranks did not agree within '
                f'{self.agreement_timeout:.0f} s: no new checkpoint; the '
                f'last complete one is {last}')
            mark_preempted(runner.logger)
            raise TrainingPreempted(
                'preempted without agreement: nothing saved at iteration '
                f'{runner.iter + 1}; resume from {last}', last,
                agreed=False) from None
        return bool(flag.item())

    def _save(self, runner) -> str:
        """The checkpoint of this iteration: CheckpointHook's, saving it
        unless that hook just did."""
        hook = self._checkpoint_hook
        if hook is None:
            raise RuntimeError(
                'PreemptionHook needs a CheckpointHook (default_hooks.'
                'checkpoint) to save the preempted iteration')
        name = hook.filename_tmpl.format(runner.iter + 1)
        if hook.last_ckpt is None or osp.basename(hook.last_ckpt) != name:
            runner.logger.info(
                f'Saving checkpoint at {runner.iter + 1} iterations '
                '(preempted)')
            hook._save_checkpoint(runner)
        return hook.last_ckpt
