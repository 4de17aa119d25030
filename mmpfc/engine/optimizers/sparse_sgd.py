"""SGD applied to a subset of rows of a parameter (Partial FC centers).

The rule is exactly ``torch.optim.SGD``'s for the rows given, using the
hyper-parameters of the param group that holds the parameter, so the
optimizer config and the param schedulers drive the centers like the
backbone. The momentum of the whole parameter lives in
``optimizer.state[param]['momentum_buffer']`` (created as zeros), so it is
saved and loaded with the optimizer state; only the given rows are read and
written.

Centers stored in 16 bits and compact momentum (``center_state_dtype``) are
read in fp32, updated in fp32 and written back in their own form
(:class:`CenterRows`, :class:`.center_state.RowState`); fp32 storage takes
exactly the fp32 path.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

import torch

from mmpfc.models.utils.chunks import rows_per_chunk
from mmpfc.models.utils.low_precision import is_compact

from .center_state import RowState

#: fp32 rows -> the same rows in the parameter's storage dtype.
Rounding = Callable[[torch.Tensor], torch.Tensor]


class CenterRows:
    """Rows of a parameter read in fp32 and written back in its dtype.

    16-bit rows are written through ``rounding`` (the owner's
    ``round_rows``: stochastic rounding from its stream), or rounded to
    nearest without one; fp32 rows are written as computed.
    """

    def __init__(self, param: torch.Tensor,
                 rounding: Optional[Rounding] = None) -> None:
        self.data = param.data
        self.rounding = rounding

    def read(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.data.index_select(0, index)
        return rows.float() if is_compact(rows.dtype) else rows

    def write(self, index: torch.Tensor, values: torch.Tensor) -> None:
        if is_compact(self.data.dtype):
            values = (self.rounding(values) if self.rounding is not None
                      else values.to(self.data.dtype))
        self.data.index_copy_(0, index, values)


def find_param_group(optimizer: torch.optim.Optimizer,
                     param: torch.Tensor) -> dict:
    """The param group of ``optimizer`` that holds ``param``."""
    for group in optimizer.param_groups:
        if any(p is param for p in group['params']):
            return group
    raise KeyError('parameter is not managed by this optimizer')


def row_chunks(data: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor
               ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """(row indices, their gradient) in chunks of ``data`` cut to
    :data:`mmpfc.models.utils.chunks.CHUNK_BYTES`, so that temporaries stay
    small whatever the number of rows."""
    # 16-bit rows are sized in fp32 bytes: the update works on fp32 copies
    size = rows_per_chunk(data[:1].numel() * max(4, data.element_size()),
                          data.device)
    for start in range(0, rows.numel(), size):
        yield rows[start:start + size], grad[start:start + size]


@torch.no_grad()
def sparse_sgd_step(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                    rows: torch.Tensor, grad: torch.Tensor,
                    state_form: str = 'float32',
                    rounding: Optional[Rounding] = None) -> None:
    """Update ``param[rows]`` with ``grad`` by the SGD rule of its group.

    ``rows`` must not repeat. Memory and work scale with ``len(rows)``, and
    the rows are processed in chunks of ``CHUNK_BYTES``, so the only
    temporaries are a few chunks; rows not given, and their momentum, are
    untouched (original Partial FC semantics: weight decay and
    momentum of a center apply when it is sampled). As in torch's SGD, the
    parameter's first step sets the momentum of its rows to the step itself
    (no dampening); a row first sampled later starts from zero momentum.

    Args:
        state_form: How the momentum is stored (``center_state_dtype``).
        rounding: How 16-bit rows are written back (:class:`CenterRows`).
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
    centers = CenterRows(param, rounding)
    buf_all, first = None, False
    if momentum != 0:
        buf_all = RowState(optimizer.state[param], 'momentum_buffer',
                           state_form)
        first = not buf_all.exists()
        if first:
            buf_all.create(data.shape[0], data.shape[1], data.device,
                           data.dtype)
    for index, chunk in row_chunks(data, rows, grad):
        weight = centers.read(index)
        step = chunk.to(weight.dtype)
        if maximize:
            step = -step
        if weight_decay != 0:
            step = step.add(weight, alpha=weight_decay)
        if buf_all is not None:
            if first:  # torch's first step: the buffer is the step itself
                buf = step.clone()
            else:
                buf = buf_all.read(index, times=momentum)
                buf.add_(step, alpha=1 - dampening)
            step = step.add(buf, alpha=momentum) if nesterov else buf
        weight.add_(step, alpha=-lr)
        if buf_all is not None:  # last use of buf: its encoding may reuse it
            buf_all.write(index, buf, consume=True)
        centers.write(index, weight)
