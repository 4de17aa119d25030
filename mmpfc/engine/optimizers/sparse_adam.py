"""Adam / AdamW applied to a subset of rows of a parameter (sampled centers).

The rule is ``torch.optim.Adam``'s (``AdamW``: decoupled weight decay) for
the rows given, with the hyper-parameters of the param group that holds the
parameter, so a ViT config's ``optimizer=dict(type='AdamW', lr=1e-3,
weight_decay=0.1)`` and its schedulers drive the centers like the backbone.

As with SGD, a center's state advances only when it is sampled: the moments
``exp_avg`` / ``exp_avg_sq`` of the whole shard live in
``optimizer.state[param]`` (one row per local class, so checkpoints shard
and re-split them), and ``row_step`` counts, per row, the updates that row
has had, which is the ``step`` of its bias correction (``step`` itself
counts the sparse updates of the shard, as torch's state requires). A row
sampled at every step therefore follows ``torch.optim.AdamW`` exactly; rows
not given are untouched.
"""
from __future__ import annotations

from typing import Optional

import torch

from .center_state import RowState
from .sparse_sgd import CenterRows, Rounding, find_param_group, row_chunks


@torch.no_grad()
def sparse_adam_step(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                     rows: torch.Tensor, grad: torch.Tensor,
                     state_form: str = 'float32',
                     rounding: Optional[Rounding] = None) -> None:
    """Update ``param[rows]`` with ``grad`` by the Adam(W) rule of its group.

    ``rows`` must not repeat; work and temporaries scale with ``len(rows)``
    (processed in chunks, see :func:`.sparse_sgd.row_chunks`). The moments
    are kept in ``state_form`` and 16-bit rows written back through
    ``rounding`` (as :func:`.sparse_sgd_step`).
    """
    group = find_param_group(optimizer, param)
    if group.get('amsgrad', False):
        raise ValueError('sampled centers do not support amsgrad=True: set '
                         'amsgrad=False, or sample_rate=1.0')
    lr, (beta1, beta2) = float(group['lr']), group['betas']
    eps, weight_decay = group['eps'], group['weight_decay']
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get(
        'decoupled_weight_decay', False)
    maximize = group.get('maximize', False)
    data = param.data
    state = optimizer.state[param]
    centers = CenterRows(param, rounding)
    exp_avg_all = RowState(state, 'exp_avg', state_form)
    exp_avg_sq_all = RowState(state, 'exp_avg_sq', state_form)
    for moment in (exp_avg_all, exp_avg_sq_all):
        if not moment.exists():
            moment.create(data.shape[0], data.shape[1], data.device,
                          data.dtype)
    if 'row_step' not in state:
        state['row_step'] = torch.zeros(data.shape[0], dtype=torch.float64,
                                        device=data.device)
    # torch's Adam expects 'step' in a non-empty state (load_state_dict);
    # here it counts the sparse updates, the same on every rank
    state['step'] = state.get('step', torch.tensor(0.0)) + 1
    row_step = state['row_step']

    for index, chunk in row_chunks(data, rows, grad):
        weight = centers.read(index)
        g = chunk.to(weight.dtype)
        if maximize:
            g = -g
        steps = row_step.index_select(0, index).add_(1)
        row_step.index_copy_(0, index, steps)
        if weight_decay != 0:
            if decoupled:
                weight.mul_(1 - lr * weight_decay)
            else:
                g = g.add(weight, alpha=weight_decay)
        exp_avg = exp_avg_all.read(index).lerp_(g, 1 - beta1)
        exp_avg_sq = exp_avg_sq_all.read(index)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        exp_avg_all.write(index, exp_avg)
        exp_avg_sq_all.write(index, exp_avg_sq)
        # per-row bias corrections, computed in float64 like torch's scalars
        step_size = (lr / (1 - beta1**steps)).to(weight.dtype)[:, None]
        correction2 = (1 - beta2**steps).sqrt().to(weight.dtype)[:, None]
        denom = (exp_avg_sq.sqrt() / correction2).add_(eps)
        weight.sub_(exp_avg / denom * step_size)
        centers.write(index, weight)
