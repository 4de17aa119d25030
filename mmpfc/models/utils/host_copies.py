"""Host copies of a shard that a checkpoint being written may reuse.

A sharded save copies rank 0's shard and its optimizer state to the host for
the shard file; MMEngine's main file would then copy the model and the
optimizer state to the host once more, only for the shard entries to be
stripped from it. ``collect_shard`` offers its copies here, and the head's
``state_dict`` and the PartialFC optim wrappers' ``state_dict`` take them
instead of copying the device tensors again.
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, Optional, Tuple

import torch

# id(param) -> (weak param, {name: host copy})
_HOST_COPIES: Dict[int, Tuple[weakref.ref, Dict[str, torch.Tensor]]] = {}


def offer_host_copies(param: torch.Tensor,
                      copies: Dict[str, torch.Tensor]) -> None:
    """Offer host copies of ``param`` (``'weight'``) and of its optimizer
    state (``'state.<key>'``) to the checkpoint being written.

    An offer is used once (:func:`take_host_copy`); it is dropped when the
    main file's shard entries are stripped, and by the owner's next
    training step or load, so a later ``state_dict`` never sees a stale
    copy.
    """
    _HOST_COPIES[id(param)] = (weakref.ref(param), dict(copies))


def take_host_copy(param: torch.Tensor,
                   name: str) -> Optional[torch.Tensor]:
    """The offered host copy ``name`` of ``param`` (removed), or None."""
    entry = _HOST_COPIES.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    copy = entry[1].pop(name, None)
    if not entry[1]:
        _HOST_COPIES.pop(id(param), None)
    return copy


def drop_host_copies(params: Optional[Iterable[torch.Tensor]] = None
                     ) -> None:
    """Forget the offers for ``params`` (all offers when None)."""
    if params is None:
        _HOST_COPIES.clear()
        return
    for param in params:
        _HOST_COPIES.pop(id(param), None)
