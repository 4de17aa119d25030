"""How class centers are split over ranks, and how a sharded tensor is marked.

A parameter marked as sharded holds different rows on every rank. DDP, weight
init broadcast, gradient clipping and checkpointing must treat it differently
from the replicated backbone; they recognise it with :func:`is_sharded`.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

_SHARDED_ATTR = 'mmpfc_sharded'
# id(param) -> (weak param, weak owner); tensors cannot be WeakKeyDictionary
# keys (their == is elementwise), so entries are dropped by a finalizer.
_OWNERS: Dict[int, Tuple[weakref.ref, weakref.ref]] = {}


class ShardRange(NamedTuple):
    """Contiguous class ids ``[start, start + num_local)`` owned by a rank."""
    start: int
    num_local: int

    @property
    def stop(self) -> int:
        return self.start + self.num_local


def shard_range(num_classes: int, rank: int, world_size: int) -> ShardRange:
    """Split ``num_classes`` over ranks; the first ``C % W`` ranks get one
    more.

    >>> shard_range(10, 2, 3)
    ShardRange(start=7, num_local=3)
    """
    if num_classes < world_size:
        raise ValueError(
            f'num_classes={num_classes} is smaller than the world size '
            f'{world_size}: every rank needs at least one class center.')
    if not 0 <= rank < world_size:
        raise ValueError(f'rank {rank} outside [0, {world_size})')
    base, extra = divmod(num_classes, world_size)
    return ShardRange(start=base * rank + min(rank, extra),
                      num_local=base + int(rank < extra))


def mark_sharded(param: torch.Tensor, owner: object = None) -> torch.Tensor:
    """Tag ``param`` as rank-local; ``owner`` is the module that updates it.

    The tag is an attribute of ``param`` (copied and pickled with it); the
    owner is kept in a weak table, not on the tensor, so that a sharded
    parameter stays picklable and a copied module can claim its copy.
    """
    setattr(param, _SHARDED_ATTR, True)
    if owner is not None:
        key = id(param)
        if key not in _OWNERS:
            weakref.finalize(param, _OWNERS.pop, key, None)
        _OWNERS[key] = (weakref.ref(param), weakref.ref(owner))
    return param


def sharded_owner(param: torch.Tensor) -> Optional[object]:
    """The module given to :func:`mark_sharded` for ``param``, if alive."""
    entry = _OWNERS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    return entry[1]()


def is_sharded(param: torch.Tensor) -> bool:
    """True for tensors tagged by :func:`mark_sharded`."""
    return bool(getattr(param, _SHARDED_ATTR, False))


def named_sharded_tensors(module: torch.nn.Module
                          ) -> List[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter and buffer of ``module``
    marked with :func:`mark_sharded`: the one way to list them."""
    return [(name, tensor) for name, tensor in (*module.named_parameters(),
                                                *module.named_buffers())
            if is_sharded(tensor)]


def sharded_names(module: torch.nn.Module) -> List[str]:
    """Names of the sharded parameters and buffers of ``module``."""
    return [name for name, _ in named_sharded_tensors(module)]


SHARD_SAFE_CONFIG = ("runner_type = 'mmpfc.PartialFCRunner'\n"
                     "model_wrapper_cfg = dict("
                     "type='mmpfc.PartialFCDistributedDataParallel')")


def active_ddp() -> Optional[torch.nn.Module]:
    """The ``DistributedDataParallel`` running the current forward, if any.

    torch (checked up to 2.14) marks it in the private
    ``DistributedDataParallel._active_ddp_module`` only while it runs.
    """
    from torch.nn.parallel import DistributedDataParallel
    return getattr(DistributedDataParallel, '_active_ddp_module', None)


def refuse_replicating_ddp(ddp: torch.nn.Module) -> None:
    """Raise if the DDP running this forward replicates sharded tensors.

    Stock DDP (MMEngine's ``MMDistributedDataParallel`` included, which a
    stock ``Runner`` uses) broadcasts rank 0's parameters at wrap time and
    averages every gradient: the ranks' own rows are gone before the first
    step, and a stock ``Runner`` then saves rank 0's rows only. The wrapper
    is visible only while it runs the forward
    (:func:`active_ddp`), so a sharded head calls this from its loss, once
    per wrapper.
    """
    ignored = set(getattr(ddp, 'parameters_to_ignore', ()))
    replicated = [name for name in sharded_names(ddp.module)
                  if name not in ignored]
    if replicated:
        fix = SHARD_SAFE_CONFIG.replace('\n', '\n    ')
        raise RuntimeError(
            f'{replicated} hold rank-local rows, but the '
            f'{type(ddp).__name__} running the model broadcasts them from '
            "rank 0 and averages their gradients: every rank now trains rank "
            "0's rows, and a stock MMEngine Runner saves rank 0's only. Add "
            f'these two lines to the config:\n    {fix}')


def split_state(state: dict, num_local: int) -> Tuple[dict, dict]:
    """Optimizer state of a shard -> (tensors with one row per class, rest).

    The rows are sharded, re-split and kept in their saved dtype like the
    shard itself; the rest is the same on every rank.
    """
    rows, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() >= 1 and \
                value.shape[0] == num_local:
            rows[key] = value
        else:
            scalars[key] = value
    return rows, scalars
