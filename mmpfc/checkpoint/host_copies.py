"""Rank 0's host copy of its shard, lent to the main file it writes next.

A sharded save copies rank 0's rows to the host for its shard file.
MMEngine's main file, written right after, would copy them to the host once
more (``weights_to_cpu`` of the model's state dict) only for the shard
entries to be stripped from it. While the main file is written,
:func:`lend_host_copies` makes the model's ``state_dict`` return the copy
already made, through a torch state-dict post-hook that is removed when the
write ends: the head knows nothing of it. (The optimizer's state needs no
such help: MMEngine saves it without a host copy, and the rows' state is
stripped before the file is written.)
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
import torch.nn as nn


@contextmanager
def lend_host_copies(model: nn.Module, payload: dict) -> Iterator[None]:
    """Within the block, ``model.state_dict()`` gives the host copies in
    ``payload`` (a shard file's content,
    :func:`~.sharded_state.collect_shard` of this model: one entry per
    sharded parameter) for the sharded parameters, not the device tensors;
    ``state_dict(keep_vars=True)`` still gives the parameters themselves.
    The live tensors are never changed.
    """
    with ExitStack() as hooks:
        for name, entry in payload['params'].items():
            module_name, _, attr = name.rpartition('.')
            module = model.get_submodule(module_name)
            hooks.callback(module.register_state_dict_post_hook(
                _module_hook(attr, entry['weight'])).remove)
        yield


def _module_hook(attr: str, copy: torch.Tensor):
    """A module state-dict post-hook putting ``copy`` under ``attr``."""

    def use_copy(module, state_dict, prefix, local_metadata) -> None:
        key = prefix + attr
        if key in state_dict and not isinstance(state_dict[key],
                                                nn.Parameter):
            state_dict[key] = copy

    return use_copy
