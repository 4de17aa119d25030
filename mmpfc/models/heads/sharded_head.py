"""The contract between a head with rank-local rows and the rest of mmpfc.

The optim wrappers (sparse updates of sampled rows, shard-aware clipping),
the DDP wrapper, the runner and the checkpoint code never look at a head's
class: they find its sharded parameters with
:func:`mmpfc.models.utils.named_sharded_tensors` and their owner with
:func:`mmpfc.models.utils.sharded_owner`, and rely on this protocol.
:class:`~.partial_fc_head.PartialFCHead` implements it; a new sharded head
implements it too and marks its rows with
:func:`mmpfc.models.utils.mark_sharded` (``owner=self``).
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple, runtime_checkable

import torch


@runtime_checkable
class ShardedHead(Protocol):
    """A head that owns rows ``[class_start, class_start + num_local)`` of
    ``num_classes`` centers on this rank; a row holds the class's centers
    (``in_channels`` values, or several sub-centers side by side).

    ``sampler`` (with ``state_dict`` / ``load_state_dict``) is saved and
    restored with the rows, and so is ``rounding`` (None, or the stream of
    the stochastic rounding of 16-bit rows). When ``samples_centers`` is
    True, a step uses some rows only; when ``row_updates`` is True (sampled
    rows, or a 16-bit shard) a step leaves the fp32 gradient of the rows it
    used to :meth:`pop_sampled_gradient` instead of ``weight.grad``, and
    the optim wrapper writes the updated rows back through
    :meth:`round_rows`. Such a wrapper calls :meth:`expect_row_updates`
    when it is built; a head that no wrapper told so refuses a training step
    while an earlier step's row gradients wait (nothing would apply them).
    """

    num_classes: int
    in_channels: int
    class_start: int
    num_local: int
    sample_rate: float
    sampler: object
    rounding: object

    @property
    def samples_centers(self) -> bool:
        """True when a step uses the sampled rows only."""

    @property
    def row_updates(self) -> bool:
        """True when the optim wrapper updates the rows a step used."""

    def round_rows(self, values: torch.Tensor) -> torch.Tensor:
        """fp32 rows in the storage dtype of the rows (16-bit: rounded
        as the head's ``center_rounding`` says)."""

    def pop_sampled_gradient(self
                             ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(rows, grad)`` since the last update (summed per row), or
        None; clears the record."""

    def expect_row_updates(self) -> None:
        """An optim wrapper will apply the row gradients at its step."""

    def clear_sampled_gradient(self) -> None:
        """Forget the sampled-row gradients (``zero_grad``)."""
