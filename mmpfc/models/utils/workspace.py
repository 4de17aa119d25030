"""A buffer handed out again step after step, once nothing views it."""
from __future__ import annotations

from typing import Optional

import torch

from mmpfc.utils.compat import storage_use_count


class Workspace:
    """The (S, max(N, D)) logit/gradient buffer, kept from step to step.

    Without a caching allocator (the CPU), a fresh buffer of a shard's size
    is mapped, page-faulted and zeroed by the kernel every step, and given
    back when the optimizer drops the gradient that lives in it; at 1M
    identities on 2 CPU ranks that costs more than the softmax itself (see
    docs/benchmark.md). The buffer is handed out again only when no tensor
    views it any more (the previous step's backward and optimizer update are
    done), so gradient accumulation and kept references stay correct.
    The peak is unchanged; between steps the buffer stays allocated.
    """

    def __init__(self) -> None:
        self._flat: Optional[torch.Tensor] = None

    @property
    def kept(self) -> Optional[torch.Tensor]:
        """The buffer kept for the next step (None before the first)."""
        return self._flat

    def take(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A 1-D buffer of ``numel`` elements of ``like``'s dtype/device."""
        if not self._reusable(numel, like):
            self._flat = None  # an unused old buffer goes before the new one
            self._flat = like.new_empty(numel)
        return self._flat[:numel]

    def _reusable(self, numel: int, like: torch.Tensor) -> bool:
        flat = self._flat
        return (flat is not None and flat.numel() >= numel
                and flat.dtype == like.dtype and flat.device == like.device
                and storage_use_count(flat) == 1)

    # A copied or pickled head (e.g. an EMA copy) starts without a buffer.
    def __deepcopy__(self, memo: dict) -> 'Workspace':
        return Workspace()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._flat = None
