"""Checkpoints that keep every rank's shard of a sharded head.

Stock MMEngine saves on rank 0 only (``Runner.save_checkpoint`` is
``@master_only``), so the centers of ranks 1..N-1, their momentum and their
sampler RNG state would be lost. This mixin makes saving collective and
loading shard-aware; the file layout is described in
:mod:`mmpfc.checkpoint.format`.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import time
from typing import Callable, Optional, Union

from mmengine.dist import (all_gather_object, barrier, broadcast_object_list,
                           get_dist_info)
from mmengine.runner.checkpoint import load_state_dict

from mmpfc.checkpoint import (MANIFEST_KEY, CheckpointError, CheckpointRows,
                              atomic_save, build_manifest, collect_shard,
                              compare_state_dicts, find_sharded_params,
                              load_file, manifest_params,
                              remove_stale_shard_dirs, shard_dir_name,
                              shard_file_name, strip_sharded, unwrap_model)
from mmpfc.checkpoint.fit import fit_rows
from mmpfc.checkpoint.format import new_token
from mmpfc.checkpoint.rng import set_process_rng_state

# Mixes the resumed iteration into a sampler's seed when its saved RNG state
# cannot be used (another world size): streams do not repeat old ones.
_RESEED_PRIME = 1_000_003


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

    _mmpfc_manifest: Optional[dict] = None
    _mmpfc_sampler_states: Optional[dict] = None
    _mmpfc_rng_state: Optional[dict] = None  # of the loaded checkpoint
    _mmpfc_pending_rng: Optional[dict] = None  # applied at the next iter
    _mmpfc_resuming_optimizer = False  # resume() checks the optimizer type

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
        start = time.perf_counter()
        rank, world_size = get_dist_info()
        token = [new_token() if rank == 0 else None]
        broadcast_object_list(token)
        shard_dir = shard_dir_name(filename, token[0])
        os.makedirs(osp.join(out_dir, shard_dir), exist_ok=True)
        payload, info = collect_shard(
            model, self.optim_wrapper if save_optimizer else None, rank,
            world_size, token[0])
        samplers = sorted(payload['samplers'])
        nbytes = atomic_save(payload, osp.join(
            out_dir, shard_dir, shard_file_name(rank, world_size)))
        del payload
        gathered = all_gather_object((nbytes, info))
        self._check_shards_visible(out_dir, shard_dir, gathered, rank,
                                   world_size)
        if rank == 0:
            manifest = build_manifest(
                manifest_params([i for _, i in gathered], world_size),
                world_size, layout='shards', shard_dir=shard_dir,
                token=token[0], shard_bytes=[n for n, _ in gathered],
                samplers=samplers)
            self._write_main_file(out_dir, filename, manifest,
                                  save_optimizer, save_param_scheduler, meta,
                                  by_epoch)
            removed = remove_stale_shard_dirs(out_dir)
            if removed:
                self.logger.info(f'Removed stale checkpoint parts {removed}')
            total = sum(n for n, _ in gathered) + osp.getsize(
                osp.join(out_dir, filename))
            self.logger.info(
                f'Saved {osp.join(out_dir, filename)} with {world_size} '
                f'shard(s) in {shard_dir}: {total / 2**20:.1f} MiB in '
                f'{time.perf_counter() - start:.2f} s')
        barrier()

    @staticmethod
    def _check_shards_visible(out_dir: str, shard_dir: str, gathered: list,
                              rank: int, world_size: int) -> None:
        """Every rank raises if rank 0 cannot see every shard complete.

        On several machines each rank writes to its own filesystem unless
        the work dir is shared; a main file would then point at shards that
        rank 0, and a later resume, cannot read. Fail at save time instead
        (the previous checkpoint stays the latest).
        """
        missing = None
        if rank == 0:
            missing = []
            for r, (nbytes, _) in enumerate(gathered):
                path = osp.join(out_dir, shard_dir,
                                shard_file_name(r, world_size))
                if not osp.isfile(path) or osp.getsize(path) != nbytes:
                    missing.append(shard_file_name(r, world_size))
        box = [missing]
        broadcast_object_list(box)
        if box[0]:
            raise CheckpointError(
                f'rank 0 cannot see {box[0]} in {osp.join(out_dir, shard_dir)}'
                ' although their ranks wrote them: the work dir must be one '
                'folder shared by every machine (e.g. NFS); nothing was '
                'saved as the latest checkpoint')

    def _write_main_file(self, out_dir: str, filename: str, manifest: dict,
                         save_optimizer: bool, save_param_scheduler: bool,
                         meta: Optional[dict], by_epoch: bool) -> None:
        """Rank 0: MMEngine's checkpoint minus the shards, then rename."""
        tmp_name = f'.{filename}.{manifest["token"]}.tmp'
        self._mmpfc_manifest = manifest
        try:
            super().save_checkpoint(
                out_dir, tmp_name, save_optimizer=save_optimizer,
                save_param_scheduler=save_param_scheduler, meta=meta,
                by_epoch=by_epoch)
        finally:
            self._mmpfc_manifest = None
        tmp_path = osp.join(out_dir, tmp_name)
        with open(tmp_path, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, osp.join(out_dir, filename))

    def call_hook(self, fn_name: str, **kwargs) -> None:
        """After all ``before_save_checkpoint`` hooks, drop the shard
        entries from the main file and add the manifest. Before the first
        iteration after a resume, put back the saved random state (after
        the train loop has skipped the batches already trained)."""
        if fn_name == 'before_train_iter' and \
                self._mmpfc_pending_rng is not None:
            set_process_rng_state(self._mmpfc_pending_rng)
            self._mmpfc_pending_rng = None
        super().call_hook(fn_name, **kwargs)
        if fn_name == 'before_save_checkpoint' and \
                self._mmpfc_manifest is not None:
            checkpoint = kwargs['checkpoint']
            strip_sharded(checkpoint, self._mmpfc_manifest['params'])
            checkpoint.setdefault('meta', {})[MANIFEST_KEY] = \
                self._mmpfc_manifest

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

        model = unwrap_model(self.model)
        source = CheckpointRows(filename, checkpoint)
        rank, world_size = get_dist_info()
        self._mmpfc_sampler_states = fit_rows(
            model, self.optim_wrapper, source, checkpoint, rank, world_size)
        # same class ranges: this rank continues the saving rank's run
        self._mmpfc_rng_state = None if self._mmpfc_sampler_states is None \
            else source.rng_state(rank)
        diff = compare_state_dicts(model.state_dict(),
                                   checkpoint['state_dict'])
        exact = strict or source.manifest is not None
        if diff.shapes or (diff and exact):
            raise CheckpointError(
                f'checkpoint {filename} does not fit the model (another '
                f'backbone or configuration?): {diff.describe()}')
        load_state_dict(model, checkpoint['state_dict'], strict=strict,
                        logger=self.logger)
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
        self._mmpfc_sampler_states = None
        self._mmpfc_rng_state = None
        self._mmpfc_resuming_optimizer = resume_optimizer
        try:
            super().resume(filename, resume_optimizer,
                           resume_param_scheduler, map_location)
        finally:
            self._mmpfc_resuming_optimizer = False
        self._mmpfc_pending_rng = self._mmpfc_rng_state
        self._mmpfc_rng_state = None
        states = self._mmpfc_sampler_states or {}
        self._mmpfc_sampler_states = None
        reseeded = []
        for sp in find_sharded_params(unwrap_model(self.model)):
            sampler = getattr(sp.owner, 'sampler', None)
            if sampler is None or not hasattr(sampler, 'load_state_dict'):
                continue
            if sp.owner_name in states:
                sampler.load_state_dict(states[sp.owner_name])
            else:
                seed = (sampler.seed + _RESEED_PRIME * self.iter) % 2**63
                sampler.load_state_dict(
                    dict(seed=seed, device=None, generator=None))
                reseeded.append(sp.owner_name)
        if reseeded:
            self.logger.info(
                f'Sampler RNG of {reseeded} reseeded: the checkpoint was '
                'saved with another world size or merged')


# Group keys that do not tell optimizer kinds apart: added by schedulers, or
# by torch releases (a checkpoint of an older torch lacks them).
_NOT_KIND_KEYS = {'params', 'initial_lr', 'foreach', 'fused', 'capturable',
                  'differentiable', 'maximize', 'decoupled_weight_decay'}


def check_optimizer_matches(filename: str, saved: Optional[dict],
                            optim_wrapper) -> None:
    """Refuse to resume optimizer state saved by another kind of optimizer.

    torch's ``load_state_dict`` of, say, AdamW over SGD state ends in
    ``KeyError: 'step'``; SGD over Adam state silently drops the moments.
    The hyper-parameter names of the parameter groups tell the kinds apart.
    """
    optimizer = getattr(optim_wrapper, 'optimizer', None)
    if not isinstance(saved, dict) or 'param_groups' not in saved or \
            optimizer is None or not saved['param_groups']:
        return
    saved_keys = sorted(set(saved['param_groups'][0]) - _NOT_KIND_KEYS)
    current = sorted(set(optimizer.param_groups[0]) - _NOT_KIND_KEYS)
    if saved_keys == current:
        return
    raise CheckpointError(
        f'{filename} holds the state of an optimizer with parameter-group '
        f'settings {saved_keys}, but this run\'s '
        f'{type(optimizer).__name__} has {current}: another optimizer type '
        'cannot continue that state. Resume with the optimizer the run was '
        'trained with, or start a new run from its weights only '
        '(load_from=PATH with resume=False).')


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
