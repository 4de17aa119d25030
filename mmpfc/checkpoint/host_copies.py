"""Rank 0's host copies of its shard, lent to the main file it writes next.

A sharded save copies rank 0's rows and their optimizer state to the host
for its shard file. MMEngine's main file, written right after, would copy
them to the host once more (``weights_to_cpu`` of the model's state dict,
the optimizer's state) only for the shard entries to be stripped from it.
While the main file is written, :func:`lend_host_copies` makes the model's
and the optimizer's ``state_dict`` return the copies already made, through
torch's state-dict post-hooks that are removed when the write ends: the
head and the optim wrappers know nothing of it.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Dict, Iterator

import torch
import torch.nn as nn

from .sharded_state import find_sharded_params, locate_param


@contextmanager
def lend_host_copies(model: nn.Module, optim_wrapper,
                     payload: dict) -> Iterator[None]:
    """Within the block, ``model.state_dict()`` and the optimizer's
    ``state_dict()`` give the host copies in ``payload`` (a shard file's
    content, :func:`~.sharded_state.collect_shard`) for the sharded
    parameters and their row-wise state, not the device tensors.

    The live tensors and the live optimizer state are never changed.
    """
    with ExitStack() as hooks:
        for sp in find_sharded_params(model):
            entry = payload['params'].get(sp.name)
            if entry is None:
                continue
            module_name, _, attr = sp.name.rpartition('.')
            module = model.get_submodule(module_name)
            hooks.callback(module.register_state_dict_post_hook(
                _module_hook(attr, entry['weight'])).remove)
            located = locate_param(optim_wrapper, sp.param) \
                if optim_wrapper is not None else None
            if located is not None and entry['rows']:
                (_, index), optimizer = located
                hooks.callback(optimizer.register_state_dict_post_hook(
                    _optimizer_hook(index, entry['rows'])).remove)
        yield


def _module_hook(attr: str, copy: torch.Tensor):
    """A module state-dict post-hook putting ``copy`` under ``attr``."""

    def use_copy(module, state_dict, prefix, local_metadata) -> None:
        if prefix + attr in state_dict:
            state_dict[prefix + attr] = copy

    return use_copy


def _optimizer_hook(index: int, rows: Dict[str, torch.Tensor]):
    """An optimizer state-dict post-hook putting ``rows`` into the state
    of parameter ``index`` (a new dict: the live state stays)."""

    def use_copies(optimizer, state_dict: dict) -> dict:
        state = state_dict.get('state', {})
        if index in state:
            state[index] = {key: rows.get(key, value)
                            for key, value in state[index].items()}
        return state_dict

    return use_copies
