"""What a margin implements so that every head, fused or not, can apply it.

A margin turns cosines into scaled logits. The heads give it, per step:

* the target cosine of every row (``cos_t``, shape (N,));
* with ``uses_norms``, the raw (un-normalized) embedding norms (N,), with
  gradient;

and it may change:

* the target logit, row by row (:meth:`BaseMargin.target_logit`);
* the non-target logits, element by element, as a function of the cosine and
  of its row's target cosine (:meth:`BaseMargin.non_target_logit`, with
  ``modifies_non_target``);
* an extra loss term per row, added to the row's cross-entropy before the
  mean (:meth:`BaseMargin.extra_loss`).

Running statistics are registered buffers: replicated on every rank, saved
with the model, and updated in :meth:`BaseMargin.prepare` (before use) from
the statistics of the global batch, so that every rank holds the same value.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpfc.utils.arg_checks import Real, arg_specs

from ..utils.distributed import all_reduce_, get_rank_and_world_size

#: An additive angular margin: in [0, pi) (past pi the angle wraps around).
ANGLE = Real(0.0, math.pi, high_open=True)
#: A momentum or a fraction.
UNIT = Real(0.0, 1.0)
NON_NEGATIVE = Real(low=0.0)


def safe_acos(cos: torch.Tensor) -> torch.Tensor:
    """``arccos`` a rounding step inside [-1, 1]: a finite slope at +-1."""
    eps = torch.finfo(cos.dtype).eps
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


@dataclass
class MarginBatch:
    """The rows of a step, as :meth:`BaseMargin.prepare` sees them.

    Attributes:
        cos_t: (N,) target cosine of every row (no gradient).
        norms: (N,) raw embedding norms (no gradient), or None when the
            margin does not use them.
        valid: (N,) bool, rows whose target cosine is known here; None: all.
        reduce: True when the rows are this rank's share of the batch (the
            replicated head under DDP): statistics are all-reduced over ranks.
            False when every rank already holds the whole global batch (the
            sharded head).
    """

    cos_t: torch.Tensor
    norms: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    reduce: bool = False

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of ``values`` over the (valid) rows of the global batch."""
        total, count = self._sum(values)
        return total / count.clamp_min(1.0)

    def mean_std(self, values: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased standard deviation over the global batch
        (two passes: no cancellation); the std of one row is 0."""
        mean = self.mean(values)
        total, count = self._sum((values - mean).square())
        var = total / (count - 1.0).clamp_min(1.0)
        return mean, var.sqrt()

    def row_ids(self) -> torch.Tensor:
        """Index of every row in the global batch (this rank's share is
        offset by ``rank * N`` when ``reduce``)."""
        num = self.cos_t.numel()
        ids = torch.arange(num, device=self.cos_t.device)
        if self.reduce:
            ids += get_rank_and_world_size()[0] * num
        return ids

    def _sum(self, values: torch.Tensor
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.valid is None:
            weights = torch.ones_like(values)
        else:
            weights = self.valid.to(values.dtype)
        sums = torch.stack([(values * weights).sum(), weights.sum()])
        if self.reduce:
            all_reduce_(sums)
        return sums[0], sums[1]


@arg_specs(s=Real(low=0.0, low_open=True, what='scale'))
class BaseMargin(nn.Module):
    """A margin on cosine logits that the heads, fused or not, can apply.

    Subclasses implement :meth:`target_logit` and, when they need them,
    :meth:`prepare` (running statistics, per-step values),
    :meth:`non_target_logit` / :meth:`non_target_slope` (with
    ``modifies_non_target = True``) and :meth:`extra_loss` (with
    ``uses_norms = True``). A subclass that keeps :meth:`forward` runs in the
    fused step of ``PartialFCHead``; one that overrides it gets the plain
    composition (normalize, linear, ``forward``, cross-entropy).

    Class attributes:
        uses_norms: The margin receives the raw embedding norms (N,).
        modifies_non_target: :meth:`non_target_logit` is not the identity.
        cos_bound: Cosines are clamped to ``[-cos_bound, cos_bound]`` before
            the margin (no gradient where clamped).
        interclass_filtering_threshold: If > 0, non-target cosines above it
            are zeroed with no gradient.

    Args:
        s: Scale applied to every logit.
    """

    uses_norms: bool = False
    modifies_non_target: bool = False
    cos_bound: float = 1.0
    interclass_filtering_threshold: float = 0.0

    def __init__(self, s: float = 64.0) -> None:
        super().__init__()
        self.s = s
        self._norms_checked = False

    # ------------------------------------------------ what a margin defines
    def prepare(self, batch: MarginBatch) -> None:
        """Update running statistics (when training) and per-step values,
        before :meth:`target_logit` is called on the same rows. Runs once
        per step without gradient."""

    def target_logit(self, cos_t: torch.Tensor,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N,) unscaled target logits of the (N,) target cosines.

        Row ``i`` may depend on ``cos_t[i]``, ``norms[i]`` and on buffers
        only; it is differentiated by autograd in both arguments.
        """
        raise NotImplementedError

    def non_target_logit(self, cos: torch.Tensor,
                         cos_t: torch.Tensor) -> torch.Tensor:
        """Unscaled non-target logits of ``cos``, element by element;
        ``cos_t`` is the row's target cosine, broadcastable against ``cos``
        ((N, 1) against (N, S), or (1, N) against the fused (S, N))."""
        return cos

    def non_target_slope(self, cos: torch.Tensor,
                         cos_t: torch.Tensor) -> torch.Tensor:
        """d :meth:`non_target_logit` / d ``cos`` (autograd by default)."""
        with torch.enable_grad():
            cos = cos.detach().requires_grad_(True)
            out = self.non_target_logit(cos, cos_t.detach())
            slope, = torch.autograd.grad(out.sum(), cos, allow_unused=True)
        return torch.zeros_like(cos) if slope is None else slope

    def apply_non_target_(self, cos: torch.Tensor, cos_t: torch.Tensor,
                          slope_out: torch.Tensor) -> None:
        """Turn the cosines ``cos`` into their non-target logits in place
        and write their slopes into ``slope_out`` (what the fused step
        calls, block by block; a margin may override it to share work
        between the two)."""
        slope_out.copy_(self.non_target_slope(cos, cos_t))
        cos.copy_(self.non_target_logit(cos, cos_t))

    def extra_loss(self, norms: Optional[torch.Tensor]
                   ) -> Optional[torch.Tensor]:
        """(N,) loss added to each row's cross-entropy, or None."""
        return None

    # ------------------------------------------------------ used by heads
    def begin_step(self, batch: MarginBatch) -> None:
        """Check the inputs and run :meth:`prepare` without gradient."""
        if self.uses_norms:
            if batch.norms is None:
                raise ValueError(f'{type(self).__name__} needs the raw '
                                 'embedding norms (norms=...)')
            self._check_norms(batch.norms)
        with torch.no_grad():
            self.prepare(batch)

    def forward(self, cos: torch.Tensor, labels: torch.Tensor,
                norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, S) scaled logits of (N, S) cosines (the plain composition).

        Args:
            cos: (N, S) cosines in [-1, 1].
            labels: (N,) target column per row, -1 when the target is not
                among these columns (another rank's shard: the row's target
                logit, non-target change and statistics need its target
                cosine, so such rows are left unchanged and not counted).
            norms: (N,) raw embedding norms, for ``uses_norms`` margins.
        """
        if not cos.shape[1]:  # no columns (e.g. an empty sample)
            return cos * self.s
        # one (row, column) per row, column 0 where the target is elsewhere
        # (kept as is): fixed sizes, so nothing is read from the device
        has_target = labels >= 0
        index = (torch.arange(labels.numel(), device=labels.device),
                 labels.clamp_min(0))
        if self.cos_bound < 1.0:
            cos = cos.clamp(-self.cos_bound, self.cos_bound)
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                keep = (cos <= self.interclass_filtering_threshold).to(
                    cos.dtype)
                keep.index_put_(index, torch.where(
                    has_target, torch.ones_like(keep[index]), keep[index]))
            cos = cos * keep
        current = cos[index]
        self.begin_step(MarginBatch(
            current.detach(), None if norms is None else norms.detach(),
            has_target, reduce=True))
        target = torch.where(has_target, self.target_logit(current, norms),
                             current)
        if self.modifies_non_target:  # rows with a target cosine only
            cos = torch.where(
                has_target[:, None],
                self.non_target_logit(cos, current.detach()[:, None]), cos)
        logits = cos.index_put(index, target)
        return logits * self.s

    def dense_loss(self, cos: torch.Tensor, labels: torch.Tensor,
                   norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy of :meth:`forward` plus the extra loss, for
        rows whose targets are all among the columns (a replicated head)."""
        logits = self(cos, labels) if norms is None else \
            self(cos, labels, norms)
        loss = F.cross_entropy(logits, labels)
        extra = self.extra_loss(norms) if norms is not None else None
        return loss if extra is None else loss + extra.mean()

    def _check_norms(self, norms: torch.Tensor) -> None:
        """Warn once if the norms are all 1: the embeddings were normalized
        before the head, so a norm-based margin sees no quality signal."""
        if self._norms_checked or not norms.numel():
            return
        self._norms_checked = True  # one device read, at the first step
        if bool(((norms.detach() - 1.0).abs() <= 1e-4).all()):
            warnings.warn(
                f'{type(self).__name__} adapts its margin to the embedding '
                'norms, but every norm is 1: the embeddings reach the head '
                'already L2-normalized (normalize after the head instead, '
                'or feed the raw features)', stacklevel=3)

    def extra_repr(self) -> str:
        return f's={self.s}'
