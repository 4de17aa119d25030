"""What of a model and its optimizer is rank-local, and how it is packed.

A parameter tagged with :func:`mmpfc.models.utils.mark_sharded` holds rows
``[class_start, class_start + num_local)`` of a (num_classes, D) matrix; its
owner module (e.g. ``PartialFCHead``) exposes ``num_classes`` and
``class_start`` and may hold a ``sampler`` with ``state_dict()``. Optimizer
state tensors of such a parameter with one row per local class (SGD's
``momentum_buffer``, Adam's ``exp_avg``...) are sharded the same way; other
entries (``step``) are the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.model import is_model_wrapper

from mmpfc.models.utils import is_sharded, shard_range, sharded_owner
from mmpfc.models.utils.low_precision import dtype_name
from mmpfc.models.utils.sharding import split_state

from .manifest import FORMAT, OptimizerLocation, ParamEntry
from .rng import process_rng_state


@dataclass
class ShardedParam:
    """A rank-local parameter, its state-dict name and its owner module."""
    name: str
    param: torch.Tensor
    owner: nn.Module
    owner_name: str

    @property
    def num_classes(self) -> int:
        return int(self.owner.num_classes)

    @property
    def class_start(self) -> int:
        return int(self.owner.class_start)

    @property
    def num_local(self) -> int:
        return int(self.param.shape[0])

    @property
    def embedding_size(self) -> int:
        return int(self.param.shape[1])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP-like wrapper (or ``model`` itself)."""
    return model.module if is_model_wrapper(model) else model


def find_sharded_params(model: nn.Module) -> List[ShardedParam]:
    """Every marked (sharded) parameter of ``model``, in registration order."""
    names = {id(module): name for name, module in model.named_modules()}
    found = []
    for name, param in model.named_parameters():
        if not is_sharded(param):
            continue
        owner = sharded_owner(param)
        if owner is None or not hasattr(owner, 'num_classes') or \
                not hasattr(owner, 'class_start') or param.dim() != 2:
            raise TypeError(
                f'sharded parameter {name!r} must be a 2-d row shard whose '
                'owner (mark_sharded(param, owner=module)) has num_classes '
                'and class_start')
        found.append(ShardedParam(name, param, owner, names.get(id(owner))))
    return found


def iter_optimizers(optim_wrapper
                    ) -> Iterator[Tuple[str, torch.optim.Optimizer]]:
    """``(key, optimizer)`` of an OptimWrapper (key '') or OptimWrapperDict."""
    if optim_wrapper is None or isinstance(optim_wrapper, dict):
        return  # not built yet (a config dict)
    wrappers = getattr(optim_wrapper, 'optim_wrappers', None)
    if wrappers is not None:
        for key, wrapper in wrappers.items():
            yield key, wrapper.optimizer
    elif isinstance(optim_wrapper, torch.optim.Optimizer):
        yield '', optim_wrapper
    elif hasattr(optim_wrapper, 'optimizer'):
        yield '', optim_wrapper.optimizer


def locate_param(
    optim_wrapper, param: torch.Tensor
) -> Optional[Tuple[OptimizerLocation, torch.optim.Optimizer]]:
    """Where ``param``'s state sits in the optimizer state dict, or None.

    ``torch.optim.Optimizer.state_dict`` numbers parameters in the order of
    its param groups; the index is that number.
    """
    for key, optimizer in iter_optimizers(optim_wrapper):
        index = 0
        for group in optimizer.param_groups:
            for p in group['params']:
                if p is param:
                    return (key, index), optimizer
                index += 1
    return None


def optimizer_entry(optimizer_state: dict, key: str) -> dict:
    """The torch optimizer state dict for ``key`` inside a checkpoint's
    ``optimizer`` entry."""
    return optimizer_state if key == '' else optimizer_state[key]


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


def _cpu(value):
    return value.detach().cpu() if torch.is_tensor(value) else value


def collect_shard(model: nn.Module, optim_wrapper, rank: int,
                  world_size: int,
                  token: str) -> Tuple[dict, Dict[str, ParamEntry]]:
    """This rank's shard file content and its description for the manifest.

    Returns:
        ``(payload, info)``: ``payload`` holds per sharded parameter its rows,
        class range, row-wise and other optimizer state, and the sampler
        state of its owner (and its stochastic-rounding stream, for 16-bit
        rows); ``info`` maps parameter names to the
        :class:`ParamEntry` this rank knows (all but ``class_ranges``,
        which :func:`manifest_params` fills in).

    Every tensor is copied to the host once: rank 0, which writes the
    MMEngine main file next, lends these copies to that file
    (:func:`~.host_copies.lend_host_copies`).
    """
    payload = dict(format=FORMAT, rank=rank, world_size=world_size,
                   token=token, params={}, samplers={}, rounding={},
                   rng=process_rng_state())
    info = {}
    for sp in find_sharded_params(model):
        expected = shard_range(sp.num_classes, rank, world_size)
        if (sp.class_start, sp.num_local) != tuple(expected):
            raise RuntimeError(
                f'{sp.name} holds rows [{sp.class_start}, '
                f'{sp.class_start + sp.num_local}) on rank {rank} of '
                f'{world_size}; shard_range says {tuple(expected)}')
        located = locate_param(optim_wrapper, sp.param)
        state = located[1].state.get(sp.param, {}) if located else {}
        rows, scalars = split_state(state, sp.num_local)
        entry = dict(
            class_start=sp.class_start, num_local=sp.num_local,
            num_classes=sp.num_classes, weight=_cpu(sp.param),
            rows={k: _cpu(v) for k, v in rows.items()},
            scalars={k: _cpu(v) for k, v in scalars.items()})
        payload['params'][sp.name] = entry
        sampler = getattr(sp.owner, 'sampler', None)
        if sampler is not None and hasattr(sampler, 'state_dict'):
            payload['samplers'][sp.owner_name] = sampler.state_dict()
        rounding = getattr(sp.owner, 'rounding', None)
        if rounding is not None:
            payload['rounding'][sp.owner_name] = rounding.state_dict()
        info[sp.name] = ParamEntry(
            num_classes=sp.num_classes, embedding_size=sp.embedding_size,
            class_ranges=(), dtype=dtype_name(sp.param.dtype),
            optimizer=None if located is None else located[0],
            row_state=tuple(sorted(rows)))
    return payload, info


def manifest_params(infos: List[Dict[str, ParamEntry]],
                    world_size: int) -> Dict[str, ParamEntry]:
    """Merge every rank's ``info`` into the manifest's ``params``: the
    entries must agree; the class range of every rank is added."""
    params = {}
    for name, first in infos[0].items():
        for rank, info in enumerate(infos):
            if info.get(name) != first:
                raise RuntimeError(
                    f'ranks disagree about sharded parameter {name!r}: rank 0 '
                    f'has {first}, rank {rank} has {info.get(name)}')
        params[name] = replace(first, class_ranges=tuple(
            (r.start, r.stop) for r in
            (shard_range(first.num_classes, k, world_size)
             for k in range(world_size))))
    return params


def strip_sharded(checkpoint: dict, params: Dict[str, ParamEntry]) -> None:
    """Remove rank 0's shard entries from an MMEngine checkpoint dict."""
    for name, entry in params.items():
        checkpoint['state_dict'].pop(name, None)
        put_row_state(checkpoint.get('optimizer'), entry.optimizer, {}, {})
