"""Save and load the sharded part of a checkpoint, on every rank.

:class:`ShardedCheckpointer` is the whole sharded-checkpoint protocol,
without a Runner: ``save`` writes every rank's shard file, checks that rank
0 sees them all, builds the :class:`~.manifest.Manifest` and lets the caller
write the main file through a callback (MMEngine's ``save_checkpoint`` in
:class:`~mmpfc.engine.runners.ShardedCheckpointMixin`), renames it into
place and removes stale shard folders; ``load`` fits the checkpoint's rows
to this rank's class range, checks the rest fits the model, loads it and
returns a :class:`LoadResult` saying what applies to this rank.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn
from mmengine.dist import (all_gather_object, barrier, broadcast_object_list,
                           get_dist_info)
from mmengine.runner.checkpoint import load_state_dict

from .checksum import sync_and_checksum
from .compare import compare_state_dicts
from .fit import fit_rows, split_matches
from .host_copies import lend_host_copies
from .io import CheckpointError, SavedFile, atomic_save, replace_recorded
from .manifest import Manifest
from .rows import CheckpointRows
from .shard_files import (new_token, remove_stale_shard_dirs, shard_dir_name,
                          shard_file_name, temp_main_name)
from .sharded_state import collect_shard, find_sharded_params, manifest_params

#: ``write_main(name, manifest)`` writes the main file ``name`` (in the
#: folder given to ``save``) without the sharded entries and with
#: ``manifest`` in ``meta['mmpfc']``
MainFileWriter = Callable[[str, Manifest], None]

# Mixes the resumed iteration into a sampler's seed when its saved RNG state
# cannot be used (another world size): streams do not repeat old ones.
_RESEED_PRIME = 1_000_003


@dataclass
class LoadResult:
    """What :meth:`ShardedCheckpointer.load` restored on this rank.

    Attributes:
        path: The main file.
        layout: ``'shards'``, or ``'inline'`` for a merged or plain file.
        saved_world_size: Ranks that saved it (1 for ``inline``).
        rows: ``(start, stop)`` of the class rows fitted into every matrix.
        split_matched: This rank holds the class ranges its rank saved (same
            world size, sharded layout): it continues that rank's run.
        sampler_states: Saved sampler states (module name -> state) that
            apply to this rank; None when the split did not match.
        rng_state: The saving rank's process random state, if it applies
            (split matched) and was saved; else None.
    """
    path: str
    layout: str
    saved_world_size: int
    rows: Dict[str, Tuple[int, int]] = field(default_factory=dict)
    split_matched: bool = False
    sampler_states: Optional[Dict[str, dict]] = None
    rounding_states: Optional[Dict[str, dict]] = None
    rng_state: Optional[dict] = None


class ShardedCheckpointer:
    """Collective save and shard-aware load of models with sharded rows.

    Call ``save`` on every rank (a call on rank 0 only waits for the others
    forever); ``load`` needs no collective and works on any world size.

    Args:
        logger: Where to report saves and reseeded samplers.
    """

    def __init__(self, logger: Optional[logging.Logger] = None) -> None:
        self.logger = logger or logging.getLogger(__name__)

    # ------------------------------------------------------------------ save
    def save(self, model: nn.Module, optim_wrapper, out_dir: str,
             filename: str, write_main: MainFileWriter) -> Manifest:
        """Save ``out_dir/filename`` and its shard folder on every rank.

        Args:
            model: The unwrapped model (with sharded parameters).
            optim_wrapper: Its optim wrapper, or None to save no optimizer
                state in the shards.
            out_dir: Local or mounted folder shared by every rank.
            filename: Name of the main file.
            write_main: Called on rank 0 only, once all shards are written
                and visible, with a temp name to write the main file to; it
                is then flushed and renamed over ``filename``.

        Returns:
            The manifest of the checkpoint (on every rank).
        """
        start = time.perf_counter()
        rank, world_size = get_dist_info()
        token = [new_token() if rank == 0 else None]
        broadcast_object_list(token)
        shard_dir = shard_dir_name(filename, token[0])
        os.makedirs(osp.join(out_dir, shard_dir), exist_ok=True)
        payload, info = collect_shard(model, optim_wrapper, rank, world_size,
                                      token[0])
        samplers = tuple(sorted(payload['samplers']))
        saved = atomic_save(payload, osp.join(
            out_dir, shard_dir, shard_file_name(rank, world_size)))
        if rank != 0:
            del payload  # rank 0 lends its host copies to the main file
        gathered = all_gather_object((saved, info))
        sizes = tuple(s.size for s, _ in gathered)
        check_shards_visible(out_dir, shard_dir, sizes, rank)
        manifest = Manifest(
            layout='shards', world_size=world_size,
            params=manifest_params([i for _, i in gathered], world_size),
            shard_dir=shard_dir, token=token[0], shard_bytes=sizes,
            shard_checksums=tuple(s.checksum for s, _ in gathered),
            samplers=samplers)
        if rank == 0:
            with lend_host_copies(model, payload):
                self._write_main_file(out_dir, filename, manifest,
                                      write_main)
            del payload
            removed = remove_stale_shard_dirs(out_dir)
            if removed:
                self.logger.info(f'Removed stale checkpoint parts {removed}')
            total = sum(sizes) + osp.getsize(osp.join(out_dir, filename))
            self.logger.info(
                f'Saved {osp.join(out_dir, filename)} with {world_size} '
                f'shard(s) in {shard_dir}: {total / 2**20:.1f} MiB in '
                f'{time.perf_counter() - start:.2f} s')
        barrier()
        return manifest

    @staticmethod
    def _write_main_file(out_dir: str, filename: str, manifest: Manifest,
                         write_main: MainFileWriter) -> None:
        """Rank 0: the main file through a temp name, fsync, rename, and
        its checksum in a sidecar (MMEngine writes it: it is checksummed
        when read back)."""
        tmp_name = temp_main_name(filename, manifest.token)
        write_main(tmp_name, manifest)
        tmp_path = osp.join(out_dir, tmp_name)
        saved = SavedFile(osp.getsize(tmp_path), sync_and_checksum(tmp_path))
        replace_recorded(tmp_path, osp.join(out_dir, filename), saved)

    # ------------------------------------------------------------------ load
    def load(self,
             model: nn.Module,
             optim_wrapper,
             filename: str,
             checkpoint: dict,
             strict: bool = False) -> LoadResult:
        """Load ``checkpoint`` (read from ``filename``) into ``model``.

        This rank's rows and their optimizer state are put into
        ``checkpoint['state_dict']`` / ``['optimizer']`` (for MMEngine's
        ``resume`` to load the optimizer from), then the state dict is
        loaded. Refused before the model changes: missing or truncated
        shards, another num_classes or embedding size, and keys or shapes
        that differ (missing / unexpected keys of a checkpoint without
        manifest only if ``strict``).
        """
        source = CheckpointRows(filename, checkpoint)
        for note in source.unverified():
            self.logger.info(note)
        rank, world_size = get_dist_info()
        rows = fit_rows(model, optim_wrapper, source, checkpoint)
        matched = split_matches(source, rows, rank, world_size)
        result = LoadResult(
            path=filename, layout=source.layout,
            saved_world_size=source.world_size, rows=rows,
            split_matched=matched,
            sampler_states=source.sampler_states(rank) if matched else None,
            rounding_states=(source.rounding_states(rank) if matched
                             else None),
            rng_state=source.rng_state(rank) if matched else None)
        diff = compare_state_dicts(model.state_dict(),
                                   checkpoint['state_dict'])
        if diff.shapes or (diff and (strict or source.manifest is not None)):
            raise CheckpointError(
                f'checkpoint {filename} does not fit the model (another '
                f'backbone or configuration?): {diff.describe()}')
        load_state_dict(model, checkpoint['state_dict'], strict=strict,
                        logger=self.logger)
        return result

    def restore_samplers(self, model: nn.Module, loaded: LoadResult,
                         iteration: int) -> List[str]:
        """Give every sampler and stochastic-rounding stream of ``model``
        its saved state, or reseed it (seed mixed with ``iteration``) when
        none applies to this rank.

        Returns the names of the reseeded sampler owners.
        """
        reseeded = []
        for sp in find_sharded_params(model):
            for attr, states in (('sampler', loaded.sampler_states),
                                 ('rounding', loaded.rounding_states)):
                stream = getattr(sp.owner, attr, None)
                if stream is None or not hasattr(stream, 'load_state_dict'):
                    continue
                states = states or {}
                if sp.owner_name in states:
                    stream.load_state_dict(states[sp.owner_name])
                    continue
                seed = (stream.seed + _RESEED_PRIME * iteration) % 2**63
                stream.load_state_dict(
                    dict(seed=seed, device=None, generator=None))
                if attr == 'sampler':
                    reseeded.append(sp.owner_name)
        if reseeded:
            self.logger.info(
                f'Sampler RNG of {reseeded} reseeded: the checkpoint was '
                'saved with another world size or merged')
        return reseeded


def check_shards_visible(out_dir: str, shard_dir: str,
                         sizes: Tuple[int, ...], rank: int) -> None:
    """Every rank raises if rank 0 cannot see every shard complete.

    On several machines each rank writes to its own filesystem unless the
    work dir is shared; a main file would then point at shards that rank 0,
    and a later resume, cannot read. Fail at save time instead (the
    previous checkpoint stays the latest). Collective.
    """
    missing = None
    if rank == 0:
        names = [shard_file_name(r, len(sizes)) for r in range(len(sizes))]
        missing = [name for name, nbytes in zip(names, sizes)
                   if not osp.isfile(osp.join(out_dir, shard_dir, name)) or
                   osp.getsize(osp.join(out_dir, shard_dir, name)) != nbytes]
    box = [missing]
    broadcast_object_list(box)
    if box[0]:
        raise CheckpointError(
            f'rank 0 cannot see {box[0]} in {osp.join(out_dir, shard_dir)} '
            'although their ranks wrote them: the work dir must be one '
            'folder shared by every machine (e.g. NFS); nothing was saved '
            'as the latest checkpoint')
