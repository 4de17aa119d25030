"""Read the rows of a sharded tensor for any class range, from any layout.

A rank of a run with another world size than the one that saved needs the
rows ``[start, stop)`` of its new shard: :class:`CheckpointRows` copies them
from the old shard files that overlap that range (memory-mapped, so only
those rows are read), or slices them out of a merged / plain checkpoint.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .format import FORMAT, check_shard_files, get_manifest
from .io import CheckpointError, load_file
from .sharded_state import OptimizerLocation, optimizer_entry, split_state

Rows = Tuple[torch.Tensor, Dict[str, torch.Tensor], dict]


class CheckpointRows:
    """Rows of the sharded tensors stored in one checkpoint.

    On construction every shard file the manifest lists is checked to exist
    with the recorded size, so an incomplete checkpoint is refused before
    anything is loaded, with the missing pieces named.

    Args:
        path: The main checkpoint file.
        checkpoint: Its loaded content.
    """

    def __init__(self, path: str, checkpoint: dict) -> None:
        self.path = path
        self.checkpoint = checkpoint
        self.manifest = get_manifest(checkpoint, path)
        self.layout = 'inline' if self.manifest is None else \
            self.manifest['layout']
        self.shard_paths: Optional[List[str]] = None
        if self.layout == 'shards':
            self.shard_paths = check_shard_files(path, self.manifest)
        self._shards: Dict[int, dict] = {}

    @property
    def world_size(self) -> int:
        return 1 if self.manifest is None else self.manifest['world_size']

    def describe(self, name: str) -> Optional[dict]:
        """num_classes, embedding_size, class_ranges, optimizer of ``name``.

        For a plain checkpoint, a 2-d ``state_dict[name]`` is taken as the
        full (C, D) matrix. None when the checkpoint does not hold ``name``.
        """
        if self.manifest is not None:
            return self.manifest['params'].get(name)
        tensor = self.checkpoint['state_dict'].get(name)
        if tensor is None or tensor.dim() != 2:
            return None
        return dict(num_classes=int(tensor.shape[0]),
                    embedding_size=int(tensor.shape[1]),
                    class_ranges=[[0, int(tensor.shape[0])]], optimizer=None)

    def shard(self, rank: int) -> dict:
        """The (memory-mapped) shard file of ``rank``, checked and cached."""
        if rank not in self._shards:
            sizes = self.manifest.get('shard_bytes') or [None] * \
                self.world_size
            path = self.shard_paths[rank]
            payload = load_file(path, f'shard of rank {rank}', mmap=True,
                                expected_size=sizes[rank])
            found = (payload.get('format'), payload.get('token'),
                     payload.get('rank'), payload.get('world_size'))
            wanted = (FORMAT, self.manifest['token'], rank, self.world_size)
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
        entry = self.describe(name)
        if entry is None:
            raise CheckpointError(f'checkpoint {self.path} has no {name!r}')
        if not 0 <= start < stop <= entry['num_classes']:
            raise CheckpointError(
                f'rows [{start}, {stop}) of {name!r} asked; checkpoint '
                f'{self.path} holds {entry["num_classes"]} classes')
        if self.layout == 'shards':
            return self._take_from_shards(name, entry, start, stop)
        if entry.get('optimizer') is not None:
            location = tuple(entry['optimizer'])
        return self._take_inline(name, entry, start, stop, location)

    def _take_inline(self, name: str, entry: dict, start: int, stop: int,
                     location: Optional[OptimizerLocation]) -> Rows:
        weight = self.checkpoint['state_dict'][name][start:stop].clone()
        state = {}
        optimizer_state = self.checkpoint.get('optimizer')
        if optimizer_state is not None and location is not None:
            key, index = location
            state = optimizer_entry(optimizer_state, key)['state'].get(
                index, {})
        rows, scalars = split_state(state, entry['num_classes'])
        return (weight, {k: v[start:stop].clone()
                         for k, v in rows.items()}, scalars)

    def _take_from_shards(self, name: str, entry: dict, start: int,
                          stop: int) -> Rows:
        weights, rows, scalars = [], {}, None
        for rank, (first, last) in enumerate(entry['class_ranges']):
            lo, hi = max(first, start), min(last, stop)
            if lo >= hi:
                continue
            part = self.shard(rank)['params'][name]
            if scalars is None:
                scalars = dict(part['scalars'])
            weights.append(part['weight'][lo - first:hi - first])
            if set(part['rows']) != set(entry['row_state']):
                raise CheckpointError(
                    f'shard of rank {rank} holds optimizer state '
                    f'{sorted(part["rows"])} for {name!r}; the manifest '
                    f'says {entry["row_state"]}')
            for key, value in part['rows'].items():
                rows.setdefault(key, []).append(value[lo - first:hi - first])
        return (torch.cat(weights), {k: torch.cat(v) for k, v in rows.items()},
                scalars or {})


class StateDictDiff(NamedTuple):
    """Keys of a model missing from a checkpoint, keys it does not have,
    and ``key: shapes`` that differ."""
    missing: List[str]
    unexpected: List[str]
    shapes: List[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, limit: int = 8) -> str:
        parts = []
        for label, keys in (('missing in the checkpoint', self.missing),
                            ('not in the model', self.unexpected),
                            ('with other shapes', self.shapes)):
            if keys:
                more = f', ... ({len(keys) - limit} more)' \
                    if len(keys) > limit else ''
                parts.append(f'{len(keys)} {label}: '
                             f'{", ".join(keys[:limit])}{more}')
        return '; '.join(parts)


def compare_state_dicts(model_state: dict,
                        checkpoint_state: dict) -> StateDictDiff:
    """How a checkpoint's state dict differs from the model's."""
    return StateDictDiff(
        missing=[k for k in model_state if k not in checkpoint_state],
        unexpected=[k for k in checkpoint_state if k not in model_state],
        shapes=[f'{k}: checkpoint {tuple(checkpoint_state[k].shape)} vs '
                f'model {tuple(v.shape)}' for k, v in model_state.items()
                if k in checkpoint_state and torch.is_tensor(v) and
                tuple(checkpoint_state[k].shape) != tuple(v.shape)])
