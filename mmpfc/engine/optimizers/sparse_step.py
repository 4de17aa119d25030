"""The optimizer rule applied to sampled rows, chosen by optimizer type."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .sparse_adam import sparse_adam_step
from .sparse_sgd import Rounding, sparse_sgd_step

SparseRule = Callable[..., None]
#: (optimizer class, rule for its sampled rows); subclasses match too.
SPARSE_RULES: Tuple[Tuple[type, SparseRule], ...] = (
    (torch.optim.SGD, sparse_sgd_step),
    (torch.optim.AdamW, sparse_adam_step),
    (torch.optim.Adam, sparse_adam_step),
)


def sparse_rule(optimizer: torch.optim.Optimizer) -> Optional[SparseRule]:
    """The row rule for ``optimizer``'s type, or None if there is none."""
    for cls, rule in SPARSE_RULES:
        if isinstance(optimizer, cls):
            return rule
    return None


def sparse_step(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                rows: torch.Tensor, grad: torch.Tensor,
                state_form: str = 'float32',
                rounding: Optional[Rounding] = None) -> None:
    """Apply ``optimizer``'s rule to rows ``rows`` of ``param``, its state
    kept in ``state_form``, 16-bit rows written back through ``rounding``
    (see :class:`.sparse_sgd.CenterRows`)."""
    rule = sparse_rule(optimizer)
    if rule is not None:
        return rule(optimizer, param, rows, grad, state_form, rounding)
    names = ', '.join(cls.__name__ for cls, _ in SPARSE_RULES)
    raise TypeError(
        'Partial FC (sample_rate < 1) updates only the sampled centers, with '
        f'the rule of one of: {names}; optimizer '
        f'{type(optimizer).__name__} is not supported (use one of those, or '
        'sample_rate=1.0 for any optimizer).')
