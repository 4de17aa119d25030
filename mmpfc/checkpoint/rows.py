"""Read the rows of a sharded tensor for any class range, from any layout.

A rank of a run with another world size than the one that saved needs the
rows ``[start, stop)`` of its new shard: :class:`CheckpointRows` copies them
from the old shard files that overlap that range (memory-mapped, so only
those rows are read), or slices them out of a merged / plain checkpoint.
"""
from __future__ import annotations

import os.path as osp
from typing import Dict, List, Optional, Tuple

import torch

from .checksum import sidecar_path
from .io import CheckpointError, load_file
from .manifest import FORMAT, OptimizerLocation, ParamEntry, get_manifest
from .shard_files import check_shard_files
from .sharded_state import optimizer_entry, split_state

Rows = Tuple[torch.Tensor, Dict[str, torch.Tensor], dict]


class CheckpointRows:
    """Rows of the sharded tensors stored in one checkpoint.

    On construction the manifest is checked and every shard file it lists
    must exist with the recorded size, so an incomplete checkpoint is
    refused before anything is loaded, with the missing pieces named. A
    shard file is verified against its recorded checksum when it is first
    read (only the shards a rank reads are read in full).

    Args:
        path: The main checkpoint file.
        checkpoint: Its loaded content.
    """

    def __init__(self, path: str, checkpoint: dict) -> None:
        self.path = path
        self.checkpoint = checkpoint
        self.manifest = get_manifest(checkpoint, path)
        self.layout = 'inline' if self.manifest is None else \
            self.manifest.layout
        self.shard_paths: Optional[List[str]] = None
        if self.layout == 'shards':
            self.shard_paths = check_shard_files(path, self.manifest)
        self._shards: Dict[int, dict] = {}

    def unverified(self) -> List[str]:
        """Notes on the files of this checkpoint that carry no checksum
        (saved before checksums, or by another tool), so are not verified:
        the main file without a sidecar, shard files checked by size only.
        """
        notes = []
        if not osp.isfile(sidecar_path(self.path)):
            notes.append(
                f'{self.path} has no checksum file '
                f'{osp.basename(sidecar_path(self.path))} (saved before '
                'checksums, or by another tool): read unverified')
        if self.layout == 'shards' and self.manifest.shard_checksums is None:
            notes.append(
                f'{self.path} records no checksums of its shard files '
                '(saved before checksums): they are checked by size only')
        return notes

    @property
    def world_size(self) -> int:
        """Ranks that saved the checkpoint (1 for a merged or plain one)."""
        return 1 if self.manifest is None else self.manifest.world_size

    def entry(self, name: str) -> Optional[ParamEntry]:
        """How ``name`` is stored; None when the checkpoint lacks it.

        For a plain checkpoint, a 2-d ``state_dict[name]`` is taken as the
        full (C, D) matrix.
        """
        if self.manifest is not None:
            return self.manifest.params.get(name)
        tensor = self.checkpoint['state_dict'].get(name)
        if tensor is None or tensor.dim() != 2:
            return None
        return ParamEntry.of_matrix(tensor)

    def describe(self, name: str) -> Optional[dict]:
        """:meth:`entry` as the manifest stores it (num_classes,
        embedding_size, class_ranges, optimizer...), or None."""
        entry = self.entry(name)
        return None if entry is None else entry.to_dict()

    def shard(self, rank: int) -> dict:
        """The (memory-mapped) shard file of ``rank``, checked and cached."""
        if rank not in self._shards:
            sizes = self.manifest.shard_bytes or [None] * self.world_size
            checksums = self.manifest.shard_checksums or \
                [None] * self.world_size
            path = self.shard_paths[rank]
            payload = load_file(path, f'shard of rank {rank}', mmap=True,
                                expected_size=sizes[rank],
                                checksum=checksums[rank])
            found = (payload.get('format'), payload.get('token'),
                     payload.get('rank'), payload.get('world_size'))
            wanted = (FORMAT, self.manifest.token, rank, self.world_size)
            if found != wanted:
                raise CheckpointError(
                    f'shard file {path} does not belong to checkpoint '
                    f'{self.path}: it says (format, token, rank, world size)'
                    f' = {found}, the manifest expects {wanted}')
            self._shards[rank] = payload
        return self._shards[rank]

    def sampler_states(self, rank: int) -> dict:
        """Sampler states saved by ``rank`` (module name -> state)."""
        if self.layout != 'shards':
            return {}
        return dict(self.shard(rank).get('samplers', {}))

    def rounding_states(self, rank: int) -> dict:
        """Stochastic-rounding streams saved by ``rank`` (module name ->
        state); empty for fp32 heads and older checkpoints."""
        if self.layout != 'shards':
            return {}
        return dict(self.shard(rank).get('rounding', {}))

    def rng_state(self, rank: int) -> Optional[dict]:
        """Process random state saved by ``rank`` (None if not saved)."""
        if self.layout != 'shards':
            return None
        return self.shard(rank).get('rng')

    def take(self, name: str, start: int, stop: int,
             location: Optional[OptimizerLocation] = None) -> Rows:
        """Rows ``[start, stop)`` of ``name``: weight, row-wise optimizer
        state, other optimizer state.

        Args:
            location: Where the optimizer state of a plain (manifest-less)
                checkpoint sits; manifests record it themselves.
        """
        entry = self.entry(name)
        if entry is None:
            raise CheckpointError(f'checkpoint {self.path} has no {name!r}')
        if not 0 <= start < stop <= entry.num_classes:
            raise CheckpointError(
                f'rows [{start}, {stop}) of {name!r} asked; checkpoint '
                f'{self.path} holds {entry.num_classes} classes')
        if self.layout == 'shards':
            return self._take_from_shards(name, entry, start, stop)
        if entry.optimizer is not None:
            location = entry.optimizer
        return self._take_inline(name, entry, start, stop, location)

    def _take_inline(self, name: str, entry: ParamEntry, start: int,
                     stop: int,
                     location: Optional[OptimizerLocation]) -> Rows:
        weight = self.checkpoint['state_dict'][name][start:stop].clone()
        state = {}
        optimizer_state = self.checkpoint.get('optimizer')
        if optimizer_state is not None and location is not None:
            key, index = location
            state = optimizer_entry(optimizer_state, key)['state'].get(
                index, {})
        rows, scalars = split_state(state, entry.num_classes)
        return (weight, {k: v[start:stop].clone()
                         for k, v in rows.items()}, scalars)

    def _take_from_shards(self, name: str, entry: ParamEntry, start: int,
                          stop: int) -> Rows:
        weights, rows, scalars = [], {}, None
        for rank, (first, last) in enumerate(entry.class_ranges):
            lo, hi = max(first, start), min(last, stop)
            if lo >= hi:
                continue
            part = self.shard(rank)['params'][name]
            if scalars is None:
                scalars = dict(part['scalars'])
            weights.append(part['weight'][lo - first:hi - first])
            if set(part['rows']) != set(entry.row_state):
                raise CheckpointError(
                    f'shard of rank {rank} holds optimizer state '
                    f'{sorted(part["rows"])} for {name!r}; the manifest '
                    f'says {list(entry.row_state)}')
            for key, value in part['rows'].items():
                rows.setdefault(key, []).append(value[lo - first:hi - first])
        return (torch.cat(weights), {k: torch.cat(v) for k, v in rows.items()},
                scalars or {})
