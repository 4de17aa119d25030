"""What backward leaves for the optimizer when a step uses some centers only.

A Partial FC step has no full-shard ``weight.grad``: the gradient of the
sampled rows is kept beside their indices until the optim wrapper applies
the optimizer's rule to those rows (``mmpfc.engine.optimizers.sparse_step``).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch


class SampledRows:
    """The gradient of the sampled rows of a shard, filled in by backward."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self.grad: Optional[torch.Tensor] = None


class SampledGradients:
    """Sampled rows of the steps since the last update and their gradients.

    Each step adds its row indices and the holder of their gradient (a
    :class:`SampledRows` record or a leaf copy of the rows); with gradient
    accumulation several steps pile up until :meth:`pop` merges them.
    """

    def __init__(self) -> None:
        self._steps: List[Tuple[torch.Tensor, Any]] = []

    def add(self, index: torch.Tensor, holder: Any) -> None:
        self._steps.append((index, holder))

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def last_index(self) -> torch.Tensor:
        """Row indices of the latest step."""
        return self._steps[-1][0]

    def pending_steps(self) -> int:
        """How many steps' backward left gradients not yet applied."""
        return sum(holder.grad is not None for _, holder in self._steps)

    def clear(self) -> None:
        self._steps = []

    def pop(self, width: int
            ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Merged ``(rows, grad)``, gradients summed per row; clears.

        None when no step produced a gradient.
        """
        pairs = [(index, holder.grad) for index, holder in self._steps
                 if holder.grad is not None]
        self._steps = []
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0]
        index = torch.cat([idx for idx, _ in pairs])
        rows, inverse = torch.unique(index, sorted=True, return_inverse=True)
        grad = pairs[0][1].new_zeros(rows.numel(), width)
        grad.index_add_(0, inverse, torch.cat([g for _, g in pairs]))
        return rows, grad
