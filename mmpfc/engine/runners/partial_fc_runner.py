"""The MMEngine Runner for models with a sharded (Partial FC) head."""
from __future__ import annotations

import math
import os
import os.path as osp
from typing import Dict, Optional, Union

import torch.nn as nn
from mmengine.dataset import InfiniteSampler
from mmengine.dist import (broadcast, broadcast_object_list, get_dist_info,
                           is_distributed)
from mmengine.hooks import CheckpointHook, EMAHook
from mmengine.model import is_model_wrapper
from mmengine.runner import Runner
from mmengine.runner.base_loop import BaseLoop
from torch.nn.parallel import DistributedDataParallel

from mmpfc.checkpoint import locate_param, unwrap_model
from mmpfc.engine.hooks.preemption_hook import PreemptionHook, WorkerSignals
from mmpfc.engine.hooks.training_health_hook import (TrainingDivergedError,
                                                     nonfinite_weights)
from mmpfc.engine.model_wrappers import PartialFCDistributedDataParallel
from mmpfc.engine.optimizers.partial_fc_optim_wrapper import ShardAwareMixin
from mmpfc.models.utils import (named_sharded_tensors, sharded_names,
                                sharded_owner)
from mmpfc.registry import MODEL_WRAPPERS, RUNNERS
from mmpfc.utils.compat import (allowing_mmengine_checkpoints,
                                scoped_registry_name, warn_if_loop_sleeps)
from mmpfc.utils.logging import ignoring_known_warnings, quiet_console
from mmpfc.utils.process_group import init_process_group_for_device

from .loader_workers import stop_loop_workers
from .sharded_checkpoint import ShardedCheckpointMixin
from .work_dir import (WorkDirInUseError, WorkDirLock, WorkDirLockedError,
                       existing_checkpoints, launched_here, lies_in,
                       point_last_checkpoint, record_launch,
                       resolve_last_checkpoint, used_work_dir_message)


class _RunComplete(Exception):
    """Raised by ``load_or_resume`` when the resumed run has no step left."""


@RUNNERS.register_module()
class PartialFCRunner(ShardedCheckpointMixin, Runner):
    """``Runner`` that keeps the rows of a sharded head rank-local.

    Differences from MMEngine's ``Runner``:

    * the console shows one line for MMEngine's environment dump, config
      dump and hook table (the log file keeps them);
    * ``setup_env`` initializes the process group with
      :func:`mmpfc.utils.process_group.init_process_group_for_device`: NCCL
      on GPUs, gloo on a machine without CUDA (stock ``init_dist`` calls
      ``torch.cuda.set_device`` and fails there);
    * ``wrap_model`` wraps a model with sharded parameters only in
      :class:`PartialFCDistributedDataParallel` (the default when
      ``model_wrapper_cfg`` is unset), which neither broadcasts nor
      all-reduces the shards; another DDP wrapper is refused before it can
      overwrite them;
    * ``_init_model_weights`` broadcasts the replicated state-dict entries
      from rank 0, never the shards;
    * the train loop's dataloader is checked against the model: a head whose
      ``num_classes`` differs from the dataset's, a loader that yields no
      batch, or one whose last batch per rank would be smaller (the sharded
      head all-gathers equal batches) fail before training;
    * checkpoints keep every rank's shard (:class:`ShardedCheckpointMixin`)
      and are never written with non-finite weights;
    * a training run holds a lock on its work dir, and a second run there
      is refused at the start of ``train`` naming the first;
    * a :class:`PreemptionHook` gets its signal handlers for the time of
      ``train``; workers restarted by torchrun resume by themselves;
    * the train loader's workers are stopped when ``train`` ends, not
      terminated at interpreter exit (:mod:`.loader_workers`), and the
      heads' label range check of the last step is read (on CUDA it is
      read one step late);
    * a fresh run refuses a work dir that holds checkpoints (unless
      ``resume`` or ``overwrite=True``), and so does resuming another
      folder's checkpoint there; ``last_checkpoint`` is resolved in the
      work dir itself and only ever names a checkpoint of the run that
      trains there; a torchrun restart resumes only its own launch's run;
      ``resume='auto'`` (``--resume``) falls back to ``load_from`` when
      there is nothing to resume; resuming a finished run says so and
      trains nothing (:mod:`.work_dir`).

    Use it with ``runner_type='PartialFCRunner'`` (set in
    ``configs/_base_/default_runtime.py``); ``tools/train.py`` builds the
    runner from the registry.
    """

    def build_logger(self, *args, **kwargs):
        """MMEngine's logger, with the start-up blocks (environment, config,
        hook order) kept in the log file and off the console."""
        logger = super().build_logger(*args, **kwargs)
        quiet_console(logger)
        return logger

    def setup_env(self, env_cfg: Dict) -> None:
        """Create the process group (gloo without CUDA), then MMEngine's."""
        if self.distributed and not is_distributed():
            dist_cfg = dict(env_cfg.get('dist_cfg', {}))
            init_process_group_for_device(self.launcher, **dist_cfg)
        with ignoring_known_warnings():  # MMEngine's OMP/MKL notice
            super().setup_env(env_cfg)

    def wrap_model(self, model_wrapper_cfg: Optional[Dict],
                   model: nn.Module) -> Union[DistributedDataParallel,
                                              nn.Module]:
        """Wrap with a DDP that ignores the shards (see the class doc)."""
        if self.distributed and not is_model_wrapper(model):
            sharded = sharded_names(model)
            if model_wrapper_cfg is None and sharded:
                model_wrapper_cfg = dict(
                    type='PartialFCDistributedDataParallel',
                    broadcast_buffers=False,
                    find_unused_parameters=self.cfg.get(
                        'find_unused_parameters', False))
            if model_wrapper_cfg is not None:
                model_wrapper_cfg = self._resolve_wrapper(
                    model_wrapper_cfg, sharded)
        return super().wrap_model(model_wrapper_cfg, model)

    @staticmethod
    def _resolve_wrapper(model_wrapper_cfg: Dict, sharded: list) -> Dict:
        """Refuse a wrapper that would overwrite shards; scope its type.

        MMEngine looks the type up in its root registry, which needs the
        scope prefix: the bare names of the mmpfc scope are accepted here.
        """
        wrapper = model_wrapper_cfg.get('type', 'MMDistributedDataParallel')
        wrapper_cls = MODEL_WRAPPERS.get(wrapper) if isinstance(
            wrapper, str) else wrapper
        if not isinstance(wrapper_cls, type):
            raise KeyError(f'model wrapper {wrapper!r} is not registered')
        if sharded and not issubclass(wrapper_cls,
                                      PartialFCDistributedDataParallel):
            raise TypeError(
                f'model_wrapper_cfg type {wrapper!r} would broadcast and '
                f'all-reduce the rank-local parameters {sharded}; use '
                "model_wrapper_cfg=dict(type="
                "'PartialFCDistributedDataParallel') or a subclass")
        return dict(model_wrapper_cfg,
                    type=scoped_registry_name(MODEL_WRAPPERS, wrapper_cls))

    def train(self) -> nn.Module:
        """MMEngine's ``train`` holding the work dir's lock, behind the
        work-dir guard, with MMEngine's checkpoint objects allowed to
        ``torch.load``; a resumed run that is already complete returns at
        once."""
        lock = self._lock_work_dir()
        preemption = [h for h in self.hooks if isinstance(h, PreemptionHook)]
        try:
            for hook in preemption:
                hook.install_signal_handlers()
            self._settle_work_dir()
            # MMEngine's own loads too (CheckpointHook's published_keys)
            with allowing_mmengine_checkpoints():
                model = super().train()
            self._check_pending_labels()
            return model
        except _RunComplete:
            self.call_hook('after_run')
            return self.model
        finally:
            stop_loop_workers(self._train_loop)
            for hook in preemption:
                hook.restore_signal_handlers()
            if lock is not None:
                lock.release()

    def _check_pending_labels(self) -> None:
        """Read the heads' label range checks of the last step: on CUDA a
        step's check is read at the next step, which the last one has not."""
        for module in unwrap_model(self.model).modules():
            check = getattr(module, 'check_pending_labels', None)
            if callable(check):
                check()

    def _lock_work_dir(self) -> Optional[WorkDirLock]:
        """Rank 0 takes the work dir's lock; every rank raises if another
        run holds it (:class:`WorkDirLock`)."""
        lock, box = None, [None]
        if self.rank == 0:
            try:
                lock = WorkDirLock(self.work_dir).acquire()
                if not lock.supported:
                    self.logger.warning(
                        f'{self.work_dir}: its filesystem does not support '
                        'flock, so no lock keeps a second run out of this '
                        'work dir; start one run per work dir')
            except WorkDirLockedError as err:
                box = [str(err)]
        if self.distributed:
            broadcast_object_list(box)
        if box[0] is not None:
            raise WorkDirLockedError(box[0])
        return lock

    def _settle_work_dir(self) -> None:
        """How this run starts among the checkpoints of its work dir; rank
        0 decides and prepares, every rank follows (:meth:`_start_plan`)."""
        plan, failure = [None], None
        self._point_after_load = None
        if self.rank == 0:
            try:
                plan = [self._start_plan()]
            except Exception as err:  # the other ranks must not wait
                plan, failure = [('error', f'{type(err).__name__}: {err}')], \
                    err
        if self.distributed:
            broadcast_object_list(plan)
        kind, detail = plan[0]
        if failure is not None:
            raise failure
        if kind == 'error':
            raise RuntimeError(f'rank 0 could not prepare {self.work_dir}: '
                               f'{detail}')
        if kind == 'refuse':
            raise WorkDirInUseError(detail)
        if kind == 'restart':
            self.logger.warning(detail)
            # the latest checkpoint of this run, else where attempt 0 began
            self._fallback_start = (self._given_checkpoint() is not None,
                                    self._load_from)
            self._resume = 'auto'

    def _auto_resume(self) -> bool:
        """Whether to resume from the work dir's latest checkpoint:
        ``resume='auto'`` (``--resume``), or ``resume`` without a file."""
        return self._resume == 'auto' or (bool(self._resume) and
                                          self._load_from is None)

    def _given_checkpoint(self) -> Optional[str]:
        """The checkpoint to resume that the config names (``--resume
        PATH``), if any."""
        if self._auto_resume() or not self._resume:
            return None
        return self._load_from

    def _start_plan(self) -> tuple:
        """(kind, detail) on rank 0, where kind is ``'go'``, ``'restart'``
        or ``'refuse'``:

        * ranks restarted by torchrun (``--max-restarts``) of the launch
          that started this work dir's run resume it from its latest
          checkpoint; a restart of another launch (e.g. of a run refused
          here) is judged like its first attempt;
        * a fresh run is refused where checkpoints lie, unless
          ``overwrite``, which also drops the old run's
          ``last_checkpoint``;
        * resuming a given checkpoint into checkpoint folders that hold
          others is refused when the file lies elsewhere (another run's),
          unless ``overwrite``; ``last_checkpoint`` names that file once
          it has loaded;
        * auto-resume (``--resume``) continues the run that is there.

        A run that goes on marks the work dir as this launch's.
        """
        dirs = [self.work_dir, *self._checkpoint_dirs()]
        found = existing_checkpoints(dirs)
        restart = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0) or 0)
        if restart > 0 and launched_here(self.work_dir):
            return 'restart', (
                f'Restarted by torchrun (restart {restart}): resuming this '
                f'run from the latest checkpoint in {self.work_dir}')
        overwrite = self.cfg.get('overwrite', False)
        auto, given = self._auto_resume(), self._given_checkpoint()
        if found and not overwrite and not auto:
            if given is None:
                return 'refuse', used_work_dir_message(self.work_dir, dirs,
                                                       found)
            if not lies_in(given, dirs):
                return 'refuse', used_work_dir_message(
                    self.work_dir, dirs, found, resuming=given)
        if not auto and given is None:
            point_last_checkpoint(self.work_dir, None)
        # a given checkpoint becomes last_checkpoint once it has loaded
        self._point_after_load = given
        record_launch(self.work_dir)
        return 'go', None

    def _checkpoint_dirs(self) -> list:
        """Where the CheckpointHooks will write (MMEngine's rule for
        ``out_dir``: ``<out_dir>/<work dir name>``)."""
        dirs = []
        for hook in self.hooks:
            if isinstance(hook, CheckpointHook):
                out = getattr(hook, 'out_dir', None)
                dirs.append(self.work_dir if out is None else osp.join(
                    out, osp.basename(osp.normpath(self.work_dir))))
        return dirs

    def load_or_resume(self) -> None:
        """Auto-resume from this work dir's ``last_checkpoint`` (resolved in
        the dir itself); without one, start as the config says (its
        ``load_from`` as initial weights, or where a restarted launch first
        started); stop before the loop if no iteration is left."""
        if self._auto_resume() and not self._has_loaded:
            latest = resolve_last_checkpoint(self.work_dir, self.logger)
            if latest is not None:
                self._resume, self._load_from = True, latest
            else:
                self._resume, self._load_from = getattr(
                    self, '_fallback_start', (False, self._load_from))
                start = f', resuming {self._load_from}' if self._resume \
                    else f', initialized from {self._load_from}' \
                    if self._load_from else ''
                self.logger.info(f'No last_checkpoint in {self.work_dir}: '
                                 f'training from the start{start}')
        loaded_before = self._has_loaded
        super().load_or_resume()
        given, self._point_after_load = getattr(
            self, '_point_after_load', None), None
        if given is not None and self.rank == 0 and self._has_loaded and \
                not loaded_before:
            try:
                point_last_checkpoint(self.work_dir, given)
            except OSError as err:  # the run goes on; only a requeue
                self.logger.warning(  # before its first save would miss
                    f'could not point {self.work_dir}/last_checkpoint at '
                    f'{given} ({err})')
        loop = self._train_loop
        if self._resume and isinstance(loop, BaseLoop) and \
                self.iter >= loop.max_iters:
            self.logger.warning(
                f'The run in {self.work_dir} is complete: it was resumed at '
                f'iteration {self.iter} of max_iters={loop.max_iters}, so '
                'there is nothing to train. To train longer, raise '
                'train_cfg.max_iters (and the schedule\'s end) with '
                '--cfg-options.')
            raise _RunComplete

    def save_checkpoint(self, out_dir: str, filename: str, *args,
                        **kwargs) -> None:
        """Refuse (on every rank) to save weights that are not finite."""
        bad, anywhere = nonfinite_weights(unwrap_model(self.model))
        if anywhere:
            where = f': {bad} on this rank' if bad else ' on another rank'
            raise TrainingDivergedError(
                f'refusing to save {osp.join(out_dir, filename)} at '
                f'iteration {self.iter}: the weights are not finite{where}. '
                'The checkpoints already in the work dir are the last good '
                'ones; resume from one after fixing the cause (e.g. a lower '
                'learning rate).')
        super().save_checkpoint(out_dir, filename, *args, **kwargs)

    def _init_model_weights(self) -> None:
        """``init_weights``, then broadcast replicated entries only."""
        model = unwrap_model(self.model)
        if not hasattr(model, 'init_weights'):
            return
        model.init_weights()
        local = set(sharded_names(model))
        for name, tensor in model.state_dict().items():
            if name not in local:
                broadcast(tensor)

    def build_dataloader(self, dataloader, *args, **kwargs):
        """MMEngine's loader; with a :class:`PreemptionHook`, its workers
        ignore the hook's signals (:class:`WorkerSignals`)."""
        loader = Runner.build_dataloader(dataloader, *args, **kwargs)
        signals = [n for h in getattr(self, '_hooks', [])
                   if isinstance(h, PreemptionHook) for n in h.signals]
        if signals and getattr(loader, 'num_workers', 0) > 0:
            loader.worker_init_fn = WorkerSignals(signals,
                                                  loader.worker_init_fn)
        return loader

    def build_optim_wrapper(self, optim_wrapper):
        """MMEngine's optim wrapper, refused if it cannot apply a sharded
        head's row gradients (:func:`check_row_updates`)."""
        built = super().build_optim_wrapper(optim_wrapper)
        check_row_updates(unwrap_model(self.model), built)
        return built

    def build_train_loop(self, loop: Union[BaseLoop, Dict]) -> BaseLoop:
        """MMEngine's train loop, after checking its data against the model."""
        loop = super().build_train_loop(loop)
        dataloader = getattr(loop, 'dataloader', None)
        if dataloader is not None:
            model = unwrap_model(self.model)
            check_train_data(model, dataloader)
            check_hooks(model, self.hooks)
            warn_if_loop_sleeps(loop, self.logger)
        return loop


def check_row_updates(model: nn.Module, optim_wrapper) -> None:
    """Refuse an optim wrapper that holds the rows of a head updated by
    rows (sampled centers, or a 16-bit shard) but is not a PartialFC
    wrapper: it would never apply their gradients. Checked when the runner
    builds it, before the first step (the head itself refuses only the
    step after an unapplied one)."""
    for name, param in named_sharded_tensors(model):
        if not getattr(sharded_owner(param), 'row_updates', False):
            continue
        located = locate_param(optim_wrapper, param)
        if located is None:  # frozen: nothing to apply
            continue
        key = located[0][0]  # '' or the key in an OptimWrapperDict
        wrapper = optim_wrapper[key] if key else optim_wrapper
        if not isinstance(wrapper, ShardAwareMixin):
            where = f'[{key!r}]' if key else ''
            raise ValueError(
                f'{name} is updated by rows (sampled centers or 16-bit '
                f'storage), but optim_wrapper{where} '
                f'({type(wrapper).__name__}) cannot apply their '
                "gradients: use type='mmpfc.PartialFCOptimWrapper' or "
                "'mmpfc.PartialFCAmpOptimWrapper'")


def check_hooks(model: nn.Module, hooks: list) -> None:
    """Refuse hooks that would lose rank-local rows of a sharded head.

    MMEngine's ``EMAHook`` keeps an averaged copy of the whole model and
    checkpoints it (``ema_state_dict``) from rank 0 only: the other ranks'
    averaged centers would be lost without a word.
    """
    ema = [type(h).__name__ for h in hooks if isinstance(h, EMAHook)]
    sharded = sharded_names(model)
    if ema and sharded:
        raise ValueError(
            f'{ema[0]} averages a copy of the model, but MMEngine saves that '
            'copy on rank 0 only, which would lose the other ranks\' rows '
            f'of the sharded {sharded}: EMA of a sharded head is not '
            'supported; remove the EMA hook from custom_hooks')


def check_train_data(model: nn.Module, dataloader) -> None:
    """Refuse a dataloader that does not fit a face model's head.

    Raises ValueError for: a head ``num_classes`` different from the
    dataset's ``num_classes`` (when the dataset has one), a loader that yields
    no batch (``drop_last`` with fewer samples on a rank than the batch),
    and, for a sharded head on several ranks with a finite sampler, batches
    that would differ between ranks: a per-rank count the batch size does
    not divide without ``drop_last``, or, with ``round_up=False`` (unequal
    counts per rank), a different number of batches per rank. The head
    all-gathers equal batches, so either would fail mid-training.
    """
    dataset = dataloader.dataset
    check_collate_fits_preprocessor(model, dataloader)
    head = getattr(model, 'head', None)
    head_classes = getattr(head, 'num_classes', None)
    data_classes = getattr(dataset, 'num_classes', None)
    if head_classes is not None and data_classes is not None and \
            int(head_classes) != int(data_classes):
        raise ValueError(
            f'the head has num_classes={head_classes} but the training '
            f'dataset {type(dataset).__name__} has num_classes='
            f'{data_classes}; set model.head.num_classes to the dataset\'s')

    batch = dataloader.batch_size
    if batch is None or isinstance(dataloader.sampler, InfiniteSampler) or \
            isinstance(getattr(dataloader, 'batch_sampler', None),
                       InfiniteSampler):
        return  # an infinite stream of full batches
    _, world_size = get_dist_info()
    counts = samples_per_rank(len(dataset), world_size, getattr(
        dataloader.sampler, 'round_up', True))
    described = (f'{counts[0]} samples per rank' if len(set(counts)) == 1
                 else f'{counts} samples on ranks 0..{world_size - 1}')
    where = (f'({described}: {len(dataset)} samples on {world_size} '
             'ranks)')
    if dataloader.drop_last and min(counts) < batch:
        raise ValueError(
            f'drop_last=True with batch_size={batch} per rank but only '
            f'{min(counts)} samples on a rank {where}: the loader yields no '
            'batch; lower the batch size')
    if world_size == 1 or not sharded_names(model):
        return
    batches = [c // batch if dataloader.drop_last else math.ceil(c / batch)
               for c in counts]
    last = [c % batch for c in counts]
    if len(set(batches)) != 1 or (not dataloader.drop_last and any(last)):
        if len(set(counts)) == 1:
            detail = (f'batch_size={batch} per rank does not divide the '
                      f'{counts[0]} samples per rank {where}: the last batch '
                      f'would hold {last[0]} samples')
        else:
            detail = (f'the ranks get {described} (the sampler has '
                      f'round_up=False): with batch_size={batch} they make '
                      f'{batches} batches, the last holding {last} samples')
        raise ValueError(
            f'{detail}, and the sharded head needs the same batch size on '
            'every rank at every step; set train_dataloader.drop_last=True '
            "(and the sampler's round_up=True), or sampler=dict(type="
            "'InfiniteSampler')")


def check_collate_fits_preprocessor(model: nn.Module, dataloader) -> None:
    """The batches of ``face_collate`` (a label tensor) and
    ``encoded_face_collate`` (encoded images) need ``FaceDataPreprocessor``;
    another preprocessor would fail on the first batch, far from the
    cause."""
    from mmpfc.datasets import encoded_face_collate, face_collate
    from mmpfc.models.recognizers.data_preprocessor import FaceDataPreprocessor
    collate = dataloader.collate_fn
    collate = getattr(collate, 'func', collate)  # functools.partial
    preprocessor = getattr(model, 'data_preprocessor', None)
    if collate in (face_collate, encoded_face_collate) and \
            not isinstance(preprocessor, FaceDataPreprocessor):
        raise ValueError(
            f'train_dataloader.collate_fn is {collate.__name__}, whose '
            'batches (a label tensor, or encoded images) only '
            "FaceDataPreprocessor reads, but the model's data_preprocessor "
            f'is {type(preprocessor).__name__}: use model.data_'
            "preprocessor=dict(type='FaceDataPreprocessor', ...) or "
            "collate_fn=dict(type='pseudo_collate') with mmpretrain's "
            'pipeline (docs/data.md, "Choosing the pipeline")')


def samples_per_rank(num_samples: int, world_size: int,
                     round_up: bool) -> list:
    """How many samples MMEngine's ``DefaultSampler`` gives each rank."""
    if round_up:  # padded with repeats to equal counts
        return [math.ceil(num_samples / world_size)] * world_size
    return [math.ceil((num_samples - r) / world_size)
            for r in range(world_size)]
