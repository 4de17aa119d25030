"""SGD applied to a subset of rows of a parameter (Partial FC centers).

The rule is exactly ``torch.optim.SGD``'s for the rows given, using the
hyper-parameters of the param group that holds the parameter, so the
optimizer config and the param schedulers drive the centers like the
backbone. The momentum of the whole parameter lives in
``optimizer.state[param]['momentum_buffer']`` (created as zeros), so it is
saved and loaded with the optimizer state; only the given rows are read and
written.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

# CHUNK_BYTES is re-exported: the budget the chunks below are cut to
from mmpfc.models.utils.chunks import CHUNK_BYTES, rows_per_chunk  # noqa


def find_param_group(optimizer: torch.optim.Optimizer,
                     param: torch.Tensor) -> dict:
    """The param group of ``optimizer`` that holds ``param``."""
    for group in optimizer.param_groups:
        if any(p is param for p in group['params']):
            return group
    raise KeyError('parameter is not managed by this optimizer')


def row_chunks(data: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor
               ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, their gradient) in chunks of ``CHUNK_BYTES`` of
    ``data``, so that temporaries stay small whatever the number of rows."""
    size = rows_per_chunk(data[:1].numel() * data.element_size(),
                          data.device)
    for start in range(0, rows.numel(), size):
        yield rows[start:start + size], grad[start:start + size]


@torch.no_grad()
def sparse_sgd_step(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                    rows: torch.Tensor, grad: torch.Tensor) -> None:
    """Update ``param[rows]`` with ``grad`` by the SGD rule of its group.

    ``rows`` must not repeat. Memory and work scale with ``len(rows)``, and
    the rows are processed in chunks of ``CHUNK_BYTES``, so the only
    temporaries are a few chunks; rows not given, and their momentum, are
    untouched (original Partial FC semantics: weight decay and
    momentum of a center apply when it is sampled).
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(
            f'sparse_sgd_step applies torch.optim.SGD\'s rule, not '
            f'{type(optimizer).__name__}\'s: call sparse_step, which picks '
            'the rule by optimizer type')
    group = find_param_group(optimizer, param)
    lr, momentum = group['lr'], group['momentum']
    weight_decay, dampening = group['weight_decay'], group['dampening']
    nesterov, maximize = group['nesterov'], group.get('maximize', False)
    data = param.data
    buf_all = None
    if momentum != 0:
        state = optimizer.state[param]
        buf_all = state.get('momentum_buffer')
        if buf_all is None:
            buf_all = torch.zeros_like(data)
            state['momentum_buffer'] = buf_all
    for index, chunk in row_chunks(data, rows, grad):
        weight = data.index_select(0, index)
        step = chunk.to(weight.dtype)
        if maximize:
            step = -step
        if weight_decay != 0:
            step = step.add(weight, alpha=weight_decay)
        if buf_all is not None:
            buf = buf_all.index_select(0, index)
            buf.mul_(momentum).add_(step, alpha=1 - dampening)
            buf_all.index_copy_(0, index, buf)
            step = step.add(buf, alpha=momentum) if nesterov else buf
        data.index_copy_(0, index, weight.add_(step, alpha=-lr))
