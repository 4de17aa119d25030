"""Checkpoints that keep every rank's shard of a sharded head: the Runner
side.

Stock MMEngine saves on rank 0 only (``Runner.save_checkpoint`` is
``@master_only``), so the centers of ranks 1..N-1, their momentum and their
sampler RNG state would be lost. :class:`ShardedCheckpointMixin` adapts a
``Runner`` to :class:`~mmpfc.checkpoint.ShardedCheckpointer`, which does the
saving and loading; it edits MMEngine's checkpoint dict through two
internal hooks, as MMEngine's own hooks (``EMAHook``) do. The file layout is
described in :mod:`mmpfc.checkpoint.shard_files`.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Optional, Union

from mmengine.hooks import Hook

from mmpfc.checkpoint import (CheckpointError, LoadResult, Manifest,
                              ShardedCheckpointer, check_optimizer_matches,
                              find_sharded_params, load_file, set_manifest,
                              strip_sharded, unwrap_model)
from mmpfc.checkpoint.rng import set_process_rng_state


class ShardedSaveHook(Hook):
    """Makes MMEngine's main file the replicated part of a sharded save.

    Lowest priority, registered when the runner is built: after the
    ``before_save_checkpoint`` of every hook of the config has edited the
    checkpoint dict, the sharded entries (written to the shard files
    already) are removed and the manifest is added. Does nothing unless
    :class:`ShardedCheckpointMixin` is writing a main file.
    """
    priority = 'LOWEST'

    def __init__(self) -> None:
        self.manifest: Optional[Manifest] = None  # set while saving

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self.manifest is not None:
            strip_sharded(checkpoint, self.manifest.params)
            set_manifest(checkpoint, self.manifest)


class ResumedRngHook(Hook):
    """Puts back a resumed rank's process random state before the first
    iteration (after the train loop skipped the batches already trained).

    Highest priority: before any other hook of that iteration draws a
    random number, as in the run that saved the state.
    """
    priority = 'HIGHEST'

    def __init__(self) -> None:
        self.state: Optional[dict] = None  # set by resume

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch=None) -> None:
        if self.state is not None:
            set_process_rng_state(self.state)
            self.state = None


class ShardedCheckpointMixin:
    """Runner mixin: every rank saves and loads its shard of a sharded head.

    Use it before ``Runner`` in the bases::

        @RUNNERS.register_module()
        class PartialFCRunner(ShardedCheckpointMixin, Runner):
            ...

    Saving (``save_checkpoint``, called on every rank by ``CheckpointHook``)
    writes each rank's rows, their optimizer state and its sampler state to
    ``<file>.shards-<token>/rank{r}-of{W}.pth``, then rank 0 writes the
    MMEngine file ``<file>`` without the sharded entries and with a manifest
    in ``meta['mmpfc']``. Every file goes through a temp file and
    ``os.replace``; the main file is written last, so a crash leaves the
    previous state of ``<file>`` usable. Shard folders whose main file was
    removed (``max_keep_ckpts``, a replaced best checkpoint) are deleted.

    Loading (``load_from``, ``resume``, ``load_checkpoint``) refuses a
    checkpoint with missing or truncated shards, another num_classes or
    embedding size, or other replicated weights (e.g. another backbone),
    before anything in the model changes. Each rank reads only the rows of
    its class range from the old shards that overlap it, so a checkpoint
    saved on W ranks resumes on any number of ranks; the sampler RNG state is
    restored when the world size is unchanged and reseeded otherwise. Merged
    (``tools/merge_checkpoint.py``) and plain checkpoints whose state dict
    holds the full (C, D) head load the same way.

    Only local (or shared, mounted) folders are supported for sharded models.
    """

    _mmpfc_loaded: Optional[LoadResult] = None  # of the last load_checkpoint
    _mmpfc_resuming_optimizer = False  # resume() checks the optimizer type

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._mmpfc_checkpointer = ShardedCheckpointer(self.logger)
        self._mmpfc_save_hook = ShardedSaveHook()
        self._mmpfc_rng_hook = ResumedRngHook()
        self.register_hook(self._mmpfc_save_hook)
        self.register_hook(self._mmpfc_rng_hook)

    # ------------------------------------------------------------------ save
    def save_checkpoint(self,
                        out_dir: str,
                        filename: str,
                        file_client_args: Optional[dict] = None,
                        save_optimizer: bool = True,
                        save_param_scheduler: bool = True,
                        meta: Optional[dict] = None,
                        by_epoch: bool = True,
                        backend_args: Optional[dict] = None) -> None:
        """Save on every rank (collective: call it on all ranks)."""
        model = unwrap_model(self.model)
        if not find_sharded_params(model):
            return super().save_checkpoint(
                out_dir, filename, file_client_args, save_optimizer,
                save_param_scheduler, meta, by_epoch, backend_args)
        if file_client_args or backend_args:
            raise NotImplementedError(
                'checkpoints of sharded models are written to a local or '
                'mounted folder; file_client_args / backend_args are not '
                'supported')
        write_main = partial(self._write_main_file, out_dir,
                             save_optimizer=save_optimizer,
                             save_param_scheduler=save_param_scheduler,
                             meta=meta, by_epoch=by_epoch)
        self._mmpfc_checkpointer.save(
            model, self.optim_wrapper if save_optimizer else None, out_dir,
            filename, write_main)

    def _write_main_file(self, out_dir: str, name: str, manifest: Manifest,
                         **save_kwargs) -> None:
        """Rank 0: MMEngine's checkpoint ``out_dir/name``, which
        :class:`ShardedSaveHook` turns into the replicated part."""
        self._mmpfc_save_hook.manifest = manifest
        try:
            super().save_checkpoint(out_dir, name, **save_kwargs)
        finally:
            self._mmpfc_save_hook.manifest = None

    # ------------------------------------------------------------------ load
    def load_checkpoint(self,
                        filename: str,
                        map_location: Union[str, Callable] = 'cpu',
                        strict: bool = False,
                        revise_keys: list = [(r'^module\.', '')]) -> dict:
        """Load weights for this rank's class range; see the class doc.

        Tensors are memory-mapped on the CPU (``map_location`` is not
        needed: loading copies them to the parameters' device). Checkpoints
        with an mmpfc manifest must match the model exactly; plain ones must
        match in shapes, and missing / unexpected keys follow ``strict``.
        """
        checkpoint = load_file(filename, mmap=True)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f'{filename} holds a '
                                  f'{type(checkpoint).__name__}, not a dict')
        if 'state_dict' not in checkpoint:  # a bare state dict
            checkpoint = dict(state_dict=checkpoint)
        if self._mmpfc_resuming_optimizer:
            check_optimizer_matches(filename, checkpoint.get('optimizer'),
                                    self.optim_wrapper)
        self.call_hook('after_load_checkpoint', checkpoint=checkpoint)
        checkpoint['state_dict'] = _revise_keys(checkpoint['state_dict'],
                                                revise_keys)
        self._mmpfc_loaded = self._mmpfc_checkpointer.load(
            unwrap_model(self.model), self.optim_wrapper, filename,
            checkpoint, strict=strict)
        self._has_loaded = True
        self.logger.info(f'Load checkpoint from {filename}')
        return checkpoint

    # ---------------------------------------------------------------- resume
    def resume(self,
               filename: str,
               resume_optimizer: bool = True,
               resume_param_scheduler: bool = True,
               map_location: Union[str, Callable] = 'default') -> None:
        """MMEngine's resume, then the samplers' RNG state; the process's
        random state is restored at the first iteration (same class ranges
        only: on another world size the ranks' streams do not map)."""
        self._mmpfc_loaded = None
        self._mmpfc_resuming_optimizer = resume_optimizer
        try:
            super().resume(filename, resume_optimizer,
                           resume_param_scheduler, map_location)
        finally:
            self._mmpfc_resuming_optimizer = False
        loaded, self._mmpfc_loaded = self._mmpfc_loaded, None
        self._mmpfc_rng_hook.state = loaded.rng_state
        self._mmpfc_checkpointer.restore_samplers(unwrap_model(self.model),
                                                  loaded, self.iter)


def _revise_keys(state_dict: dict, revise_keys: list) -> dict:
    """Rename state-dict keys by ``(pattern, replacement)`` pairs."""
    metadata = getattr(state_dict, '_metadata', None)
    for pattern, replacement in revise_keys:
        state_dict = type(state_dict)(
            (re.sub(pattern, replacement, k), v)
            for k, v in state_dict.items())
    if metadata is not None:
        state_dict._metadata = metadata
    return state_dict
