"""Cosine logits, margin and sharded softmax cross-entropy in one autograd op.

The plain composition ``F.linear(F.normalize(e), F.normalize(w))`` -> margin
-> cross-entropy keeps, per step, a normalized copy of the (S, D) centers,
several (N, S) logit temporaries and, in backward, the gradient of the
normalized centers next to the gradient of the raw ones. At millions of
classes those copies dominate both time and memory. This function computes
the same loss and gradients with:

* no normalized copy of the centers: ``cos = (w @ e_n^T) / |w|`` and the
  gradient ``dL/dw = g - |w|^-2 (g . w) w`` with ``g = G @ e_n``;
* one logit buffer of ``S x N`` values (classes by rows, so that a chunk of
  centers is a block of rows), turned in place into cosine, logit, ``exp``
  and, in backward, the gradient; it is freed as soon as backward is done
  (or kept for the next step by a :class:`Workspace`);
* sampled centers (``index`` given) gathered chunk by chunk (the budget of
  :mod:`mmpfc.models.utils.chunks`) and never held whole; their gradient
  goes to a :class:`SampledRows` record instead of a full-shard
  ``weight.grad``.

The margin (a :class:`~mmpfc.models.losses.BaseMargin`) sees the target
cosine of every row of the global batch: the rank that holds a row's target
contributes it to one all-reduce of N values. Its target logit (and, for a
norm-based margin, the extra loss) is differentiated by autograd on those N
values and the N raw norms; a non-target change is applied element by
element to the buffer, and its slope, taken at the same time, is kept in
one more (S, N) tensor for backward (only for such margins: four bytes per
logit instead of a second matrix product of the centers).

Nothing is read from the device on CUDA (no host-device synchronization):
the targets are addressed with one (row, column) pair per column, columns
whose target lives on another rank included (masked, never changed), and
the positions whose cosine was clamped (outside [-1, 1] by rounding, no
gradient) are kept as a bit mask of S x N bits (:mod:`.bit_mask`).

Sub-centers (``num_subcenters=K > 1``, sub-center ArcFace): a row of
``weight`` holds the K sub-centers of one class side by side, (S, K*D). Per
chunk the K cosines of each class are computed in a small temporary; the
buffer keeps their maximum (the class cosine, which the margin sees) and a
uint8 (S, N) map keeps which sub-center gave it. Backward sends each class
gradient to that sub-center only, removes its radial part with that
sub-center's norm, and writes the (S, K*D) gradient into the same buffer
(width ``max(N, K*D)``). K = 1 is the same backward with one sub-center
(no map, nothing to route); its forward writes the cosines straight into
the buffer.

:class:`FusedMarginSoftmax` runs the step as the named stages of
:class:`_Steps`, in order; what backward needs of forward travels in one
:class:`_Saved`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..losses import BaseMargin, MarginBatch
from ..utils.chunks import rows_per_chunk
from ..utils.distributed import all_reduce_
from ..utils.workspace import Workspace
from .bit_mask import keeps_bit_mask, pack_clamped, zero_clamped
from .sampled_gradients import SampledRows

__all__ = ['FusedMarginSoftmax', 'MAX_SUBCENTERS', 'NORM_EPS',
           'check_num_subcenters', 'check_subcenters', 'chunk_rows',
           'fused_margin_softmax', 'supports_fused']

NORM_EPS = 1e-12  # as F.normalize
#: Sub-centers per class at most (the arg-max is kept as uint8).
MAX_SUBCENTERS = 255

#: (row, column) of every column's target in the (S, N) logits
_Positions = Tuple[torch.Tensor, torch.Tensor]


def supports_fused(margin: torch.nn.Module) -> bool:
    """True for a :class:`BaseMargin` that keeps the stock ``forward`` (a
    margin that overrides it asks for the plain composition)."""
    return (isinstance(margin, BaseMargin)
            and type(margin).forward is BaseMargin.forward)


def chunk_rows(num_rows: int, width: int, device: torch.device,
               itemsize: int = 4) -> int:
    """Rows per chunk so that a chunk of ``width`` columns fits the budget."""
    return max(1, min(num_rows, rows_per_chunk(width * itemsize, device)))


def check_num_subcenters(value: object) -> int:
    """``value`` as K, or ValueError: an int in [1, :data:`MAX_SUBCENTERS`]
    (the arg-max sub-center is kept as uint8)."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            not 1 <= value <= MAX_SUBCENTERS:
        raise ValueError(f'num_subcenters must be an int in [1, '
                         f'{MAX_SUBCENTERS}], got {value!r}')
    return value


def check_subcenters(weight: torch.Tensor, emb: torch.Tensor,
                     subs: int) -> None:
    """A row of ``weight`` must hold ``subs`` centers of the embedding
    size (a wrong width would otherwise be read as other sub-centers)."""
    check_num_subcenters(subs)
    if weight.dim() != 2 or weight.shape[1] != subs * emb.shape[1]:
        raise ValueError(
            f'centers of shape {tuple(weight.shape)} do not hold {subs} '
            f'sub-center(s) of the embedding size {emb.shape[1]} per row')


def _spans(total: int, size: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


class _TargetTerms:
    """The margin's per-row values of a step and their slopes.

    ``logit``: unscaled target logit (N,); ``slope``: its derivative in the
    target cosine; ``norm_slope``: its derivative in the raw norm (None if
    it does not depend on it); ``extra`` / ``extra_slope``: the extra loss
    per row and its derivative in the norm (None without one). Autograd
    differentiates the N values (the margin is row by row).
    """

    def __init__(self, margin: BaseMargin, cos_t: torch.Tensor,
                 norms: Optional[torch.Tensor]) -> None:
        self.norm_slope = self.extra = self.extra_slope = None
        with torch.enable_grad():
            cos_t = cos_t.detach().requires_grad_(True)
            if norms is not None:
                norms = norms.detach().requires_grad_(True)
            logit = margin.target_logit(cos_t, norms)
            if norms is None:
                self.slope, = torch.autograd.grad(logit.sum(), cos_t)
            else:
                self.slope, self.norm_slope = torch.autograd.grad(
                    logit.sum(), (cos_t, norms), allow_unused=True)
                extra = margin.extra_loss(norms)
                if extra is not None:
                    self.extra_slope, = torch.autograd.grad(
                        extra.sum(), norms, allow_unused=True)
                    self.extra = extra.detach()
            if self.slope is None:  # a target logit that ignores cos
                self.slope = torch.zeros_like(cos_t)
        self.logit = logit.detach()
        self.cos_t = cos_t.detach()

    def norm_gradient(self, prob_t: torch.Tensor, scale: float,
                      factor: torch.Tensor) -> Optional[torch.Tensor]:
        """d loss / d norm per row (None when nothing depends on it), with
        ``prob_t`` the target probability and ``factor`` = grad / N."""
        grad = None
        if self.norm_slope is not None:
            grad = (prob_t - 1.0) * scale * self.norm_slope
        if self.extra_slope is not None:
            grad = self.extra_slope if grad is None else \
                grad + self.extra_slope
        return None if grad is None else grad * factor


class _Plan(NamedTuple):
    """How a step is cut: S used rows of K sub-centers, N columns, and the
    rows per chunk that keep a chunk's temporaries within the budget."""
    total: int
    num: int
    subs: int
    size: int
    need_w: bool  # backward writes the centers' gradient into the buffer

    @classmethod
    def make(cls, emb: torch.Tensor, weight: torch.Tensor,
             index: Optional[torch.Tensor], subs: int,
             need_w: bool) -> '_Plan':
        num = emb.shape[0]
        total = weight.shape[0] if index is None else index.numel()
        # a chunk of K-wide rows and its (chunk*K, N) cosines fit the budget
        size = chunk_rows(total, subs * max(emb.shape[1], num), emb.device,
                          emb.element_size())
        return cls(total, num, subs, size, need_w)


class _Routing(NamedTuple):
    """Which logits get a gradient, and which sub-center it goes to."""
    arg: Optional[torch.Tensor]  # (S, N) uint8 arg-max sub-center, K > 1
    bits: Optional[torch.Tensor]  # clamped positions, one bit each
    clamped: Optional[_Positions]  # clamped positions, found on the CPU


class _Targets(NamedTuple):
    """Each column's target: where it is and its (all-reduced) cosine."""
    at: Optional[_Positions]  # row 0 where the target is on another rank
    present: torch.Tensor  # (N,) the target is one of this rank's rows
    cos: torch.Tensor  # (N,) the target cosine of every row


class _MarginChanges(NamedTuple):
    """What the margin changed in the logits, for backward."""
    target: _TargetTerms
    filtered: Optional[torch.Tensor]  # non-targets zeroed by the filter
    slope: Optional[torch.Tensor]  # d logit / d cos, (S, N), if not 1


@dataclass
class _Saved:
    """What backward needs of forward besides ``ctx.saved_tensors``."""
    plan: _Plan
    buffer: torch.Tensor  # the logits, then the centers' gradient
    index: Optional[torch.Tensor]
    record: Optional[SampledRows]
    routing: _Routing
    targets: _Targets
    margin: _MarginChanges
    scale: float
    row_sum: torch.Tensor


class _Steps:
    """The stages of the fused step, in the order they run."""

    # ---------------------------------------------------------- forward
    @staticmethod
    def unit_embeddings(
            emb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, D) unit rows and the (N,) norms they were divided by."""
        emb_norm = torch.linalg.vector_norm(emb, dim=1).clamp_min_(NORM_EPS)
        return emb / emb_norm[:, None], emb_norm

    @staticmethod
    def logit_buffer(plan: _Plan, emb: torch.Tensor, weight: torch.Tensor,
                     workspace: Optional[Workspace]) -> torch.Tensor:
        """The flat buffer of the (S, N) logits; backward writes the
        (S, D) (or (S, K*D)) center gradient into the same memory."""
        width = max(plan.num, weight.shape[1]) if plan.need_w else plan.num
        numel = plan.total * width
        if workspace is not None:
            return workspace.take(numel, emb)
        return emb.new_empty(numel)

    @staticmethod
    def gather_rows(weight: torch.Tensor, index: Optional[torch.Tensor],
                    start: int, stop: int,
                    dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the (sampled) centers, in ``dtype``."""
        if index is None:
            rows = weight[start:stop]
        else:
            rows = weight.index_select(0, index[start:stop])
        return rows.to(dtype)

    @staticmethod
    def cosines(plan: _Plan, buffer: torch.Tensor, weight: torch.Tensor,
                index: Optional[torch.Tensor], emb_n: torch.Tensor,
                bound: float
                ) -> Tuple[torch.Tensor, torch.Tensor, _Routing]:
        """The (S, N) class cosines, clamped to [-bound, bound], written
        chunk by chunk into ``buffer``; the (S, K) center norms and where
        backward sends each logit's gradient."""
        total, num, device = plan.total, plan.num, emb_n.device
        logits = buffer[:total * num].view(total, num)
        w_norm = emb_n.new_empty(total, plan.subs)
        arg = None if plan.subs == 1 else torch.empty(
            (total, num), dtype=torch.uint8, device=device)
        bits = None
        if total and keeps_bit_mask(device):
            bits = torch.empty((total, (num + 7) // 8), dtype=torch.uint8,
                               device=device)
        for start, stop in _spans(total, plan.size):
            rows = _Steps.gather_rows(weight, index, start, stop,
                                      emb_n.dtype)
            cos = _Steps.chunk_cosines(
                rows, emb_n, w_norm[start:stop], logits[start:stop],
                None if arg is None else arg[start:stop])
            if bits is not None:
                pack_clamped(cos, bits[start:stop], bound)
                cos.clamp_(-bound, bound)
        clamped = None
        if total and bits is None:
            clamped = _Steps.clamp_and_find(logits, bound)
        return logits, w_norm, _Routing(arg, bits, clamped)

    @staticmethod
    def chunk_cosines(rows: torch.Tensor, emb_n: torch.Tensor,
                      w_norm: torch.Tensor, out: torch.Tensor,
                      arg: Optional[torch.Tensor]) -> torch.Tensor:
        """Class cosines of a chunk of rows into ``out`` (c, N), the
        (c, K) center norms into ``w_norm``; with sub-centers the largest
        of each class's K, whose position goes into ``arg``."""
        if arg is not None:
            return _Steps.max_subcenter_cosines(rows, emb_n, w_norm, out,
                                                arg)
        norm = w_norm[:, 0]
        torch.linalg.vector_norm(rows, dim=1, out=norm)
        cos = torch.mm(rows, emb_n.t(), out=out)
        return cos.mul_(norm.clamp_min(NORM_EPS).reciprocal()[:, None])

    @staticmethod
    def max_subcenter_cosines(rows: torch.Tensor, emb_n: torch.Tensor,
                              w_norm: torch.Tensor, out: torch.Tensor,
                              arg: torch.Tensor) -> torch.Tensor:
        """The largest of each class's K sub-center cosines, computed in a
        (c*K, N) chunk-sized temporary."""
        count, subs = w_norm.shape
        sub = rows.reshape(count * subs, -1)
        norm = torch.linalg.vector_norm(sub, dim=1)
        w_norm.copy_(norm.view(count, subs))
        cos = torch.mm(sub, emb_n.t())
        cos.mul_(norm.clamp_min_(NORM_EPS).reciprocal_()[:, None])
        best, which = cos.view(count, subs, -1).max(dim=1)
        arg.copy_(which)
        return out.copy_(best)

    @staticmethod
    def clamp_and_find(logits: torch.Tensor,
                       bound: float) -> Optional[_Positions]:
        """Clamp the cosines; the positions that were outside the bound,
        or None (one device read: meant for the CPU)."""
        clamped = None
        low, high = torch.aminmax(logits)
        if low < -bound or high > bound:
            clamped = ((logits < -bound) | (logits > bound)).nonzero(
                as_tuple=True)
        logits.clamp_(-bound, bound)
        return clamped

    @staticmethod
    def target_cosines(logits: torch.Tensor,
                       labels: torch.Tensor) -> _Targets:
        """Every row's target cosine, from the rank that holds it (one
        all-reduce of N values): the margin sees the whole global batch."""
        num = labels.shape[0]
        present = labels >= 0
        at = None
        if logits.shape[0]:
            at = (labels.clamp_min(0), torch.arange(num,
                                                    device=labels.device))
        cos_t = logits.new_zeros(num) if at is None else \
            logits[at].masked_fill_(~present, 0.0)
        all_reduce_(cos_t)
        return _Targets(at, present, cos_t)

    @staticmethod
    def apply_margin(logits: torch.Tensor, margin: BaseMargin,
                     targets: _Targets, emb_norm: torch.Tensor,
                     size: int) -> _MarginChanges:
        """Turn the cosines into scaled logits in place: the margin's
        target logits, its filter and non-target change, times ``s``."""
        norms = emb_norm if margin.uses_norms else None
        margin.begin_step(MarginBatch(targets.cos, norms))
        terms = _TargetTerms(margin, targets.cos, norms)
        filtered = _Steps.filter_non_targets(
            logits, margin.interclass_filtering_threshold, targets)
        slope = None
        if margin.modifies_non_target and logits.shape[0]:
            slope = _Steps.non_target_slope(logits, margin, targets, size)
        at = targets.at
        if at is not None:
            logits.index_put_(at, torch.where(targets.present, terms.logit,
                                              logits[at]))
        logits.mul_(margin.s)
        return _MarginChanges(terms, filtered, slope)

    @staticmethod
    def filter_non_targets(logits: torch.Tensor, threshold: float,
                           targets: _Targets) -> Optional[torch.Tensor]:
        """Zero the non-target cosines above ``threshold`` (if > 0); the
        mask of them, for backward."""
        if threshold <= 0:
            return None
        filtered = logits > threshold
        at = targets.at
        if at is not None:  # the target column is never filtered
            filtered.index_put_(at, filtered[at] & ~targets.present)
        logits.masked_fill_(filtered, 0.0)
        return filtered

    @staticmethod
    def non_target_slope(logits: torch.Tensor, margin: BaseMargin,
                         targets: _Targets, size: int) -> torch.Tensor:
        """Apply the margin's non-target change chunk by chunk and keep
        d logit / d cos of every entry (1 at the targets, whose own slope
        is the terms')."""
        slope = torch.empty_like(logits)
        for start, stop in _spans(logits.shape[0], size):
            margin.apply_non_target_(logits[start:stop], targets.cos[None, :],
                                     slope[start:stop])
        at = targets.at
        if at is not None:
            slope.index_put_(at, torch.where(
                targets.present, torch.ones_like(targets.cos), slope[at]))
        return slope

    @staticmethod
    def log_sum_exp(logits: torch.Tensor, scale: float,
                    terms: _TargetTerms) -> Tuple[torch.Tensor, torch.Tensor]:
        """Softmax over the columns of every rank (distributed max, then
        sum of ``exp`` in place): the row sums and the mean loss."""
        if logits.shape[0]:
            row_max = logits.amax(dim=0)
        else:
            row_max = logits.new_full((logits.shape[1], ), -float('inf'))
        all_reduce_(row_max, dist.ReduceOp.MAX)
        row_sum = logits.sub_(row_max).exp_().sum(dim=0)
        all_reduce_(row_sum)
        row_loss = row_sum.log() + row_max - scale * terms.logit
        if terms.extra is not None:
            row_loss += terms.extra
        return row_sum, row_loss.mean()

    # --------------------------------------------------------- backward
    @staticmethod
    def logit_gradient(grad: torch.Tensor, saved: _Saved,
                       factor: torch.Tensor) -> Optional[torch.Tensor]:
        """Turn the ``exp`` values in place into d loss / d cos =
        (p - onehot) * s * factor, times the target slope at the targets;
        zero where nothing flows. Returns the target probabilities."""
        at, scale = saved.targets.at, saved.scale
        prob_t = None
        if at is not None:
            prob_t = grad[at] / saved.row_sum
        grad.mul_((factor * scale) / saved.row_sum)
        if at is not None:
            grad_t = (prob_t - 1.0) * factor * scale * \
                saved.margin.target.slope
            grad.index_put_(at, torch.where(saved.targets.present, grad_t,
                                            grad[at]))
        if saved.margin.filtered is not None:
            grad.masked_fill_(saved.margin.filtered, 0.0)
        if saved.routing.clamped is not None:  # positions (CPU)
            grad[saved.routing.clamped] = 0.0
        return prob_t

    @staticmethod
    def center_gradients(
        grad: torch.Tensor, saved: _Saved, emb_n: torch.Tensor,
        w_norm: torch.Tensor, weight: torch.Tensor, need_e: bool
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The (S, K*D) gradient of the used rows (written over the
        logits) and the (N, D) gradient of the unit embeddings.

        Block [a, b) of the gradient goes to elements [a*W, b*W) of the
        buffer after every logit row it could overwrite is used: rows in
        descending order when N <= W, ascending otherwise.
        """
        plan, width = saved.plan, weight.shape[1]
        grad_w = None
        if plan.need_w:
            grad_w = saved.buffer[:plan.total * width].view(
                plan.total, width)
        grad_e = torch.zeros_like(emb_n) if need_e else None
        inv_norm = w_norm.clamp_min(NORM_EPS).reciprocal_()
        spans = list(_spans(plan.total, plan.size))
        for start, stop in (reversed(spans) if plan.num <= width else spans):
            rows = _Steps.gather_rows(weight, saved.index, start, stop,
                                      emb_n.dtype)
            _Steps.block_gradient(grad, rows, emb_n, inv_norm, w_norm, saved,
                                  grad_w, grad_e, start, stop)
        return grad_w, grad_e

    @staticmethod
    def block_gradient(grad: torch.Tensor, rows: torch.Tensor,
                       emb_n: torch.Tensor, inv_norm: torch.Tensor,
                       w_norm: torch.Tensor, saved: _Saved,
                       grad_w: Optional[torch.Tensor],
                       grad_e: Optional[torch.Tensor], start: int,
                       stop: int) -> None:
        """Backward of rows ``[start, stop)``: d loss / d cos of a class
        goes to its arg-max sub-center only (with K = 1, its center)."""
        count, subs = stop - start, inv_norm.shape[1]
        routing, slope = saved.routing, saved.margin.slope
        block = grad[start:stop]
        if routing.bits is not None:  # clamped cosines: no gradient
            zero_clamped(block, routing.bits[start:stop])
        routed = _Steps.route_to_subcenters(
            block, inv_norm[start:stop].reshape(-1),
            None if slope is None else slope[start:stop],
            None if routing.arg is None else routing.arg[start:stop])
        sub = rows.reshape(count * subs, -1)
        if grad_e is not None:
            grad_e.addmm_(routed.t(), sub)
        if grad_w is not None:
            num, width = grad.shape[1], grad_w.shape[1]
            # with K = 1 the product reads the block's logits in the buffer
            overlap = routed is block and (max(start * num, start * width) <
                                           min(stop * num, stop * width))
            _Steps.tangential_gradient(
                routed, sub, emb_n, inv_norm[start:stop].reshape(-1),
                w_norm[start:stop].reshape(-1),
                grad_w[start:stop].view(count * subs, -1), overlap)

    @staticmethod
    def route_to_subcenters(block: torch.Tensor, inv: torch.Tensor,
                            slope: Optional[torch.Tensor],
                            which: Optional[torch.Tensor]) -> torch.Tensor:
        """d loss / d (w_k . e_n) of a (c, N) block, (c*K, N): times the
        non-target slope, zero for every sub-center but the arg-max, over
        that sub-center's norm ``1 / inv``. K = 1 (``which`` None): the
        block itself, scaled in place (norm, then slope: the rounding of
        the two products depends on their order)."""
        if which is None:
            block.mul_(inv[:, None])
            return block if slope is None else block.mul_(slope)
        if slope is not None:
            block.mul_(slope)
        count, subs = block.shape[0], inv.numel() // block.shape[0]
        routed = block.new_zeros(count, subs, block.shape[1])
        routed.scatter_(1, which.long().unsqueeze(1), block.unsqueeze(1))
        return routed.view(count * subs, -1).mul_(inv[:, None])

    @staticmethod
    def tangential_gradient(routed: torch.Tensor, sub: torch.Tensor,
                            emb_n: torch.Tensor, inv: torch.Tensor,
                            norms: torch.Tensor, out: torch.Tensor,
                            overlap: bool) -> None:
        """``out`` = the (c*K, D) gradient of the raw sub-centers ``sub``:
        ``routed @ e_n`` less its radial part (the centers are normalized),
        each with its own norm. ``overlap``: ``routed`` shares memory with
        ``out``, so the product goes through a temporary."""
        grad = torch.mm(routed, emb_n) if overlap else torch.mm(
            routed, emb_n, out=out)
        coef = (grad * sub).sum(dim=1).mul_(inv * inv).neg_()
        coef.masked_fill_(norms <= NORM_EPS, 0)
        grad.addcmul_(sub, coef[:, None])
        if overlap:
            out.copy_(grad)

    @staticmethod
    def embedding_gradient(grad_e: torch.Tensor, emb_n: torch.Tensor,
                           emb_norm: torch.Tensor,
                           norm_grad: Optional[torch.Tensor]) -> torch.Tensor:
        """d loss / d emb from that of the unit rows (radial part removed),
        plus the margin's own d loss / d norm (``norm_grad``, masked to
        the rows whose target this rank holds)."""
        radial = (grad_e * emb_n).sum(dim=1, keepdim=True)
        radial.masked_fill_(emb_norm[:, None] <= NORM_EPS, 0)
        grad_emb = grad_e.sub_(radial * emb_n).div_(emb_norm[:, None])
        if norm_grad is not None:
            grad_emb.addcmul_(emb_n, norm_grad[:, None])
        return grad_emb

    @staticmethod
    def norm_gradient(saved: _Saved, prob_t: Optional[torch.Tensor],
                      emb_norm: torch.Tensor,
                      factor: torch.Tensor) -> Optional[torch.Tensor]:
        """The margin's d loss / d norm per row, counted on the rank that
        holds the row's target (None when nothing depends on the norm)."""
        targets = saved.targets
        if targets.at is None:
            return None
        norm_grad = saved.margin.target.norm_gradient(
            prob_t, saved.scale, factor)
        if norm_grad is None:
            return None
        keep = targets.present & (emb_norm > NORM_EPS)
        return torch.where(keep, norm_grad, torch.zeros_like(norm_grad))

    @staticmethod
    def deliver_center_gradient(
            grad_w: Optional[torch.Tensor], saved: _Saved,
            weight: torch.Tensor) -> Optional[torch.Tensor]:
        """``weight``'s gradient for autograd (in its dtype), or None when
        the rows' gradient goes to the record instead (summed over
        steps)."""
        record = saved.record
        if record is None:
            return None if grad_w is None else grad_w.to(weight.dtype)
        if grad_w is not None:
            record.grad = grad_w if record.grad is None else \
                record.grad.add_(grad_w)
        return None


class FusedMarginSoftmax(torch.autograd.Function):
    """Mean margin-softmax loss of (N, D) embeddings over sharded centers."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, weight: torch.Tensor,
                index: Optional[torch.Tensor], labels: torch.Tensor,
                margin: BaseMargin,
                record: Optional[SampledRows],
                workspace: Optional[Workspace],
                subs: int = 1) -> torch.Tensor:
        check_subcenters(weight, emb, subs)
        # a record takes the rows' fp32 gradient (sampled rows, or every
        # row of a 16-bit shard); otherwise autograd's weight.grad does
        need_w = (record is not None or
                  (index is None and ctx.needs_input_grad[1]))
        plan = _Plan.make(emb, weight, index, subs, need_w)
        emb_n, emb_norm = _Steps.unit_embeddings(emb)
        buffer = _Steps.logit_buffer(plan, emb, weight, workspace)
        logits, w_norm, routing = _Steps.cosines(plan, buffer, weight, index,
                                                 emb_n, margin.cos_bound)
        targets = _Steps.target_cosines(logits, labels)
        changes = _Steps.apply_margin(logits, margin, targets, emb_norm,
                                      plan.size)
        row_sum, loss = _Steps.log_sum_exp(logits, margin.s, changes.target)
        ctx.forward_state = _Saved(plan, buffer, index, record, routing,
                                   targets, changes, margin.s, row_sum)
        ctx.save_for_backward(emb_n, emb_norm, w_norm, weight)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor
                 ) -> Tuple[Optional[torch.Tensor], ...]:
        emb_n, emb_norm, w_norm, weight = ctx.saved_tensors
        saved = ctx.forward_state
        ctx.forward_state = None  # once: the buffer is rewritten
        plan = saved.plan
        grad = saved.buffer[:plan.total * plan.num].view(plan.total, plan.num)
        factor = grad_loss / plan.num
        prob_t = _Steps.logit_gradient(grad, saved, factor)
        grad_w, grad_e = _Steps.center_gradients(grad, saved, emb_n, w_norm,
                                                 weight,
                                                 ctx.needs_input_grad[0])
        grad_weight = _Steps.deliver_center_gradient(grad_w, saved, weight)
        if grad_e is None:
            return None, grad_weight, None, None, None, None, None, None
        norm_grad = _Steps.norm_gradient(saved, prob_t, emb_norm, factor)
        del saved, grad, grad_w  # masks and slopes go before the last step
        grad_emb = _Steps.embedding_gradient(grad_e, emb_n, emb_norm,
                                             norm_grad)
        return grad_emb, grad_weight, None, None, None, None, None, None


def fused_margin_softmax(emb: torch.Tensor, weight: torch.Tensor,
                         index: Optional[torch.Tensor], labels: torch.Tensor,
                         margin: BaseMargin,
                         record: Optional[SampledRows] = None,
                         workspace: Optional[Workspace] = None,
                         num_subcenters: int = 1) -> torch.Tensor:
    """Global mean loss of ``emb`` against ``weight`` (or its ``index`` rows).

    Args:
        emb: (N, D) embeddings of the global batch (same on every rank).
        weight: (num_local, D) shard of the centers, or (num_local, K*D)
            with K sub-centers per class (a class row holds them side by
            side; the class cosine is the largest of its K cosines).
        index: Sorted rows of ``weight`` used this step, or None for all.
        labels: (N,) target position among the used rows, -1 if the target
            lives on another rank.
        margin: A :class:`BaseMargin` that keeps the stock ``forward``
            (:func:`supports_fused`).
        record: Where the fp32 gradient of the used rows is stored (the
            ``index`` rows, or every row with ``index`` None); None: with
            ``index`` None the gradient goes to ``weight.grad`` as usual.
        workspace: Reused logit/gradient buffer (None: a new one per call).
        num_subcenters: K, the sub-centers per class row of ``weight``.

    The result equals the margin softmax of the dense (N, C) cosines of
    the used columns of every rank (``margin.dense_loss`` on one process),
    computed as the log-sum-exp (no underflow of the target probability);
    with sub-centers, of the (N, C) class cosines, each the largest of its
    class's K sub-center cosines.
    """
    return FusedMarginSoftmax.apply(emb, weight, index, labels, margin,
                                    record, workspace, num_subcenters)
