"""Fit the rows of a checkpoint to a model: this rank's class range.

Used by :class:`~mmpfc.checkpoint.ShardedCheckpointer` before the
checkpoint dict is handed to MMEngine's loading code: the sharded entries
are put back into ``state_dict`` and ``optimizer`` with the shapes of this
rank's parameters, so the rest loads as a single-rank checkpoint would.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch.nn as nn

from .io import CheckpointError
from .manifest import OptimizerLocation
from .rows import CheckpointRows
from .sharded_state import find_sharded_params, locate_param, put_row_state


class RowTarget(NamedTuple):
    """A (C, D) matrix of the model to fill from rows of a checkpoint."""
    start: int
    stop: int
    num_classes: int
    embedding_size: int
    location: Optional[OptimizerLocation]  # of its optimizer state


def row_targets(model: nn.Module, optim_wrapper,
                source: CheckpointRows) -> Dict[str, RowTarget]:
    """Every matrix of ``model`` to fill from rows of the checkpoint: its
    sharded parameters (their class range), and replicated parameters the
    checkpoint holds sharded (all rows)."""
    targets = {}
    for sp in find_sharded_params(model):
        located = locate_param(optim_wrapper, sp.param)
        targets[sp.name] = RowTarget(
            sp.class_start, sp.class_start + sp.num_local, sp.num_classes,
            sp.embedding_size, located[0] if located else None)
    if source.manifest is None:
        return targets
    model_state = model.state_dict()
    for name in source.manifest.params:
        if name in targets:
            continue
        if name not in model_state or model_state[name].dim() != 2:
            raise CheckpointError(
                f'checkpoint {source.path} holds the sharded {name!r}, '
                'which the model does not have')
        rows, dim = model_state[name].shape  # a replicated head: all rows
        targets[name] = RowTarget(0, int(rows), int(rows), int(dim), None)
    return targets


def check_sharded_shapes(targets: Dict[str, RowTarget],
                         source: CheckpointRows) -> None:
    """Refuse a checkpoint that lacks a matrix of ``targets`` or holds it
    with another num_classes or embedding size than the model."""
    errors = []
    for name, target in targets.items():
        entry = source.entry(name)
        classes, dim = target.num_classes, target.embedding_size
        if entry is None:
            errors.append(
                f'it has no {name!r} (the model\'s {classes} x {dim} class '
                'centers; to load only a backbone use its init_cfg=dict('
                'type=\'Pretrained\', checkpoint=..., prefix=\'backbone.\'))')
        elif (entry.num_classes, entry.embedding_size) != (classes, dim):
            hint = '' if source.manifest is not None or \
                entry.num_classes > classes else (
                    '; a file saved without ShardedCheckpointMixin holds '
                    'only one rank\'s rows')
            if entry.num_classes == classes and dim != entry.embedding_size \
                    and max(dim, entry.embedding_size) % min(
                        dim, entry.embedding_size) == 0:
                hint += ('; a row holds num_subcenters x the embedding '
                         'size: another num_subcenters?')
            errors.append(
                f'{name!r} was saved with num_classes={entry.num_classes}'
                f' and embedding size {entry.embedding_size}, the model '
                f'has num_classes={classes} and embedding size {dim}{hint}')
    if errors:
        raise CheckpointError(f'checkpoint {source.path} does not fit the '
                              f'model: {"; ".join(errors)}')


def fit_rows(model: nn.Module, optim_wrapper, source: CheckpointRows,
             checkpoint: dict) -> Dict[str, Tuple[int, int]]:
    """Put this rank's rows and their optimizer state into ``checkpoint``.

    Everything is checked before ``checkpoint`` changes. Returns the class
    range ``(start, stop)`` put in for every matrix.
    """
    targets = row_targets(model, optim_wrapper, source)
    check_sharded_shapes(targets, source)
    for name, target in targets.items():
        weight, rows, scalars = source.take(name, target.start, target.stop,
                                            target.location)
        checkpoint['state_dict'][name] = weight
        saved = source.entry(name).optimizer
        put_row_state(checkpoint.get('optimizer'),
                      target.location if saved is None else saved, rows,
                      scalars)
    return {name: (t.start, t.stop) for name, t in targets.items()}


def split_matches(source: CheckpointRows, rows: Dict[str, Tuple[int, int]],
                  rank: int, world_size: int) -> bool:
    """Whether ``rank`` of ``world_size`` holds the class ranges its rank
    saved (``rows`` from :func:`fit_rows`): then it continues that rank's
    run, and the saved sampler and random states apply."""
    return source.layout == 'shards' and \
        source.world_size == world_size and all(
            tuple(source.entry(name).class_ranges[rank]) == tuple(span)
            for name, span in rows.items())
