"""How class centers are split over ranks, and how a sharded tensor is marked.

A parameter marked as sharded holds different rows on every rank. DDP, weight
init broadcast, gradient clipping and checkpointing must treat it differently
from the replicated backbone; they recognise it with :func:`is_sharded`.
"""
from __future__ import annotations

import weakref
from typing import Dict, NamedTuple, Optional, Tuple

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
    """Split ``num_classes`` over ranks; the first ``C % W`` ranks get one more.

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
