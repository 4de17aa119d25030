"""Fit the rows of a checkpoint to a model: this rank's class range.

Used by :class:`~mmpfc.engine.runners.ShardedCheckpointMixin` before the
checkpoint dict is handed to MMEngine's loading code: the sharded entries
are put back into ``state_dict`` and ``optimizer`` with the shapes of this
rank's parameters, so the rest loads as a single-rank checkpoint would.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch.nn as nn

from .io import CheckpointError
from .loader import CheckpointRows
from .sharded_state import (OptimizerLocation, find_sharded_params,
                            locate_param, optimizer_entry)

# name -> (start, stop, num_classes, embedding size, optimizer location)
Targets = Dict[str, Tuple[int, int, int, int, Optional[OptimizerLocation]]]


def put_row_state(optimizer_state: Optional[dict],
                  location: Optional[OptimizerLocation], rows: dict,
                  scalars: dict) -> None:
    """Replace the optimizer state at ``location`` of a checkpoint's
    ``optimizer`` entry (nothing to do without either)."""
    if optimizer_state is None or location is None:
        return
    state = optimizer_entry(optimizer_state, location[0])['state']
    state.pop(location[1], None)
    if rows or scalars:
        state[location[1]] = {**scalars, **rows}


def row_targets(model: nn.Module, optim_wrapper,
                source: CheckpointRows) -> Targets:
    """Every matrix of ``model`` to fill from rows of the checkpoint: its
    sharded parameters (their class range), and replicated parameters the
    checkpoint holds sharded (all rows)."""
    targets = {}
    for sp in find_sharded_params(model):
        located = locate_param(optim_wrapper, sp.param)
        targets[sp.name] = (sp.class_start, sp.class_start + sp.num_local,
                            sp.num_classes, sp.embedding_size,
                            located[0] if located else None)
    if source.manifest is None:
        return targets
    model_state = model.state_dict()
    for name in source.manifest['params']:
        if name in targets:
            continue
        if name not in model_state or model_state[name].dim() != 2:
            raise CheckpointError(
                f'checkpoint {source.path} holds the sharded {name!r}, '
                'which the model does not have')
        rows, dim = model_state[name].shape  # a replicated head: all rows
        targets[name] = (0, int(rows), int(rows), int(dim), None)
    return targets


def check_targets(targets: Targets, source: CheckpointRows) -> None:
    """Refuse a checkpoint whose matrices do not have the model's shape."""
    errors = []
    for name, (_, _, classes, dim, _) in targets.items():
        entry = source.describe(name)
        if entry is None:
            errors.append(
                f'it has no {name!r} (the model\'s {classes} x {dim} class '
                'centers; to load only a backbone use its init_cfg=dict('
                'type=\'Pretrained\', checkpoint=..., prefix=\'backbone.\'))')
        elif (entry['num_classes'], entry['embedding_size']) != (classes,
                                                                 dim):
            hint = '' if source.manifest is not None or \
                entry['num_classes'] > classes else (
                    '; a file saved without ShardedCheckpointMixin holds '
                    'only one rank\'s rows')
            errors.append(
                f'{name!r} was saved with num_classes={entry["num_classes"]}'
                f' and embedding size {entry["embedding_size"]}, the model '
                f'has num_classes={classes} and embedding size {dim}{hint}')
    if errors:
        raise CheckpointError(f'checkpoint {source.path} does not fit the '
                              f'model: {"; ".join(errors)}')


def fit_rows(model: nn.Module, optim_wrapper, source: CheckpointRows,
             checkpoint: dict, rank: int,
             world_size: int) -> Optional[dict]:
    """Put this rank's rows and their optimizer state into ``checkpoint``.

    Everything is checked before ``checkpoint`` changes. Returns the sampler
    states saved for this rank when the class ranges are the ones it had at
    save time, else None (they cannot be used).
    """
    targets = row_targets(model, optim_wrapper, source)
    check_targets(targets, source)
    for name, (start, stop, _, _, location) in targets.items():
        weight, rows, scalars = source.take(name, start, stop, location)
        checkpoint['state_dict'][name] = weight
        saved = source.describe(name).get('optimizer')
        put_row_state(checkpoint.get('optimizer'),
                      location if saved is None else tuple(saved), rows,
                      scalars)
    same_split = source.layout == 'shards' and \
        source.world_size == world_size and all(
            list(source.describe(name)['class_ranges'][rank]) ==
            [start, stop] for name, (start, stop, *_) in targets.items())
    return source.sampler_states(rank) if same_split else None
