"""The optimizer rule applied to sampled rows, chosen by optimizer type."""
from __future__ import annotations

from typing import Callable, Tuple

import torch

from .sparse_adam import sparse_adam_step
from .sparse_sgd import sparse_sgd_step

SparseRule = Callable[[torch.optim.Optimizer, torch.Tensor, torch.Tensor,
                       torch.Tensor], None]
#: (optimizer class, rule for its sampled rows); subclasses match too.
SPARSE_RULES: Tuple[Tuple[type, SparseRule], ...] = (
    (torch.optim.SGD, sparse_sgd_step),
    (torch.optim.AdamW, sparse_adam_step),
    (torch.optim.Adam, sparse_adam_step),
)


def sparse_step(optimizer: torch.optim.Optimizer, param: torch.Tensor,
                rows: torch.Tensor, grad: torch.Tensor) -> None:
    """Apply ``optimizer``'s rule to rows ``rows`` of ``param``."""
    for cls, rule in SPARSE_RULES:
        if isinstance(optimizer, cls):
            return rule(optimizer, param, rows, grad)
    names = ', '.join(cls.__name__ for cls, _ in SPARSE_RULES)
    raise TypeError(
        'Partial FC (sample_rate < 1) updates only the sampled centers, with '
        f'the rule of one of: {names}; optimizer '
        f'{type(optimizer).__name__} is not supported (use one of those, or '
        'sample_rate=1.0 for any optimizer).')
