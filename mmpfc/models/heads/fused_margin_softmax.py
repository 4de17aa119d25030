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
  and, in backward, the gradient; it is freed as soon as backward is done;
* sampled centers (``index`` given) gathered chunk by chunk
  (``CHUNK_BYTES``) and never held whole; their gradient goes to a
  :class:`SampledRows` record instead of a full-shard ``weight.grad``.

The margin's target logit is differentiated by autograd on the (at most N)
target cosines, so any ``CombinedMarginLoss`` setting works unchanged.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mmpfc.utils.compat import storage_use_count
from ..losses import CombinedMarginLoss
from ..utils.distributed import all_reduce_
from .sampled_gradients import SampledRows

NORM_EPS = 1e-12  # as F.normalize
#: Bytes of one chunk of gathered centers (and of the logits beside them).
CHUNK_BYTES = {'cpu': 2**20, 'cuda': 256 * 2**20}


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


def supports_fused(margin: torch.nn.Module) -> bool:
    """True for a ``CombinedMarginLoss`` that keeps the stock ``forward``."""
    return (isinstance(margin, CombinedMarginLoss)
            and type(margin).forward is CombinedMarginLoss.forward)


def chunk_rows(num_rows: int, width: int, device: torch.device,
               itemsize: int = 4) -> int:
    """Rows per chunk so that a chunk of ``width`` columns fits the budget."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES['cuda'])
    return max(1, min(num_rows, budget // max(1, width * itemsize)))


def _spans(total: int, size: int) -> Iterator[Tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _rows(weight: torch.Tensor, index: Optional[torch.Tensor], start: int,
          stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:stop`` of the (sampled) centers, in ``dtype``."""
    if index is None:
        rows = weight[start:stop]
    else:
        rows = weight.index_select(0, index[start:stop])
    return rows.to(dtype)


class FusedMarginSoftmax(torch.autograd.Function):
    """Mean margin-softmax loss of (N, D) embeddings over sharded centers."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, weight: torch.Tensor,
                index: Optional[torch.Tensor], labels: torch.Tensor,
                margin: CombinedMarginLoss,
                record: Optional[SampledRows],
                workspace: Optional[Workspace]) -> torch.Tensor:
        num, dtype = emb.shape[0], emb.dtype
        emb_norm = torch.linalg.vector_norm(emb, dim=1).clamp_min_(NORM_EPS)
        emb_n = emb / emb_norm[:, None]
        total = weight.shape[0] if index is None else index.numel()
        size = chunk_rows(total, max(emb.shape[1], num), emb.device,
                          emb.element_size())
        need_w = (ctx.needs_input_grad[1] if index is None else
                  record is not None)
        # logits transposed, (S, N): a chunk of centers is a block of rows.
        # Backward writes the (S, D) center gradient into the same buffer.
        width = max(num, emb.shape[1]) if need_w else num
        buffer = (workspace.take(total * width, emb) if workspace is not None
                  else emb.new_empty(total * width))
        logits = buffer[:total * num].view(total, num)
        w_norm = emb.new_empty(total)
        for start, stop in _spans(total, size):
            rows = _rows(weight, index, start, stop, dtype)
            torch.linalg.vector_norm(rows, dim=1, out=w_norm[start:stop])
            cos = torch.mm(rows, emb_n.t(), out=logits[start:stop])
            cos.mul_(w_norm[start:stop].clamp_min(NORM_EPS).reciprocal()[:,
                                                                         None])
        # outside [-1, 1] by rounding only: clamp, and no gradient there
        clamped = None
        if total:
            low, high = torch.aminmax(logits)
            if low < -1 or high > 1:
                clamped = ((logits < -1) | (logits > 1)).nonzero(
                    as_tuple=True)
            logits.clamp_(-1.0, 1.0)

        rows_t = (labels >= 0).nonzero(as_tuple=True)[0]
        target = (labels[rows_t], rows_t)  # where each row's target lives
        with torch.enable_grad():
            cos_t = logits[target].requires_grad_(True)
            logit_t = margin.target_logit(cos_t)
            slope_t, = torch.autograd.grad(logit_t.sum(), cos_t)
        filtered = None
        if margin.interclass_filtering_threshold > 0:
            filtered = logits > margin.interclass_filtering_threshold
            filtered[target] = False  # the target column is never filtered
            logits.masked_fill_(filtered, 0.0)
        scale = margin.s
        logits[target] = logit_t.detach()
        logits.mul_(scale)

        # softmax over the columns of every rank: max, exp, sum
        row_max = logits.amax(dim=0) if total else emb.new_full(
            (num, ), -float('inf'))
        all_reduce_(row_max, dist.ReduceOp.MAX)
        row_sum = logits.sub_(row_max).exp_().sum(dim=0)
        all_reduce_(row_sum)
        target_logit = emb.new_zeros(num)
        target_logit[rows_t] = scale * logit_t.detach()
        all_reduce_(target_logit)
        loss = (row_sum.log() + row_max - target_logit).mean()

        ctx.buffer, ctx.clamped, ctx.filtered = buffer, clamped, filtered
        ctx.need_w = need_w
        ctx.target, ctx.slope_t, ctx.size = target, slope_t, size
        ctx.row_sum, ctx.scale, ctx.index, ctx.record = (row_sum, scale,
                                                         index, record)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(emb_n, emb_norm, w_norm, weight)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        emb_n, emb_norm, w_norm, weight = ctx.saved_tensors
        index, record, target = ctx.index, ctx.record, ctx.target
        (total, num), dim = (w_norm.numel(), emb_n.shape[0]), emb_n.shape[1]
        scale, buffer, need_w = ctx.scale, ctx.buffer, ctx.need_w
        need_e = ctx.needs_input_grad[0]
        grad = buffer[:total * num].view(total, num)
        # d loss / d logit = (p - onehot) * grad_loss / N, p = exp / row_sum;
        # through the margin: times s, and at the target times its slope
        factor = grad_loss / num
        prob_t = grad[target] / ctx.row_sum[target[1]]
        grad.mul_((factor * scale) / ctx.row_sum)
        grad[target] = (prob_t - 1.0) * factor * scale * ctx.slope_t
        for mask in (ctx.filtered, ctx.clamped):
            if mask is not None:
                grad[mask] = 0.0
        inv_norm = w_norm.clamp_min(NORM_EPS).reciprocal_()
        grad.mul_(inv_norm[:, None])  # d loss / d (w . e_n)

        # The (S, D) gradient overwrites the (S, N) logits in place: block
        # [a, b) is written to elements [a*D, b*D), after every logit row it
        # could overwrite is used (rows in descending order when N <= D,
        # ascending otherwise); a block overlapping its own logits goes
        # through a small temporary.
        grad_w = buffer[:total * dim].view(total, dim) if need_w else None
        grad_e = torch.zeros_like(emb_n) if need_e else None
        spans = list(_spans(total, ctx.size))
        for start, stop in (reversed(spans) if num <= dim else spans):
            rows = _rows(weight, index, start, stop, emb_n.dtype)
            block = grad[start:stop]
            if need_w:
                overlap = (max(start * num, start * dim) <
                           min(stop * num, stop * dim))
                out = torch.mm(block, emb_n) if overlap else torch.mm(
                    block, emb_n, out=grad_w[start:stop])
            if need_e:
                grad_e.addmm_(block.t(), rows)
            if need_w:
                # remove the radial part: the centers are normalized
                inv = inv_norm[start:stop]
                coef = (out * rows).sum(dim=1).mul_(inv * inv).neg_()
                coef.masked_fill_(w_norm[start:stop] <= NORM_EPS, 0)
                out.addcmul_(rows, coef[:, None])
                if overlap:
                    grad_w[start:stop] = out
        ctx.buffer = ctx.filtered = ctx.record = None
        grad_emb = None
        if need_e:
            radial = (grad_e * emb_n).sum(dim=1, keepdim=True)
            radial.masked_fill_(emb_norm[:, None] <= NORM_EPS, 0)
            grad_emb = grad_e.sub_(radial * emb_n).div_(emb_norm[:, None])
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        if index is None:
            return grad_emb, grad_w, None, None, None, None, None
        if grad_w is not None:
            record.grad = grad_w if record.grad is None else \
                record.grad.add_(grad_w)
        return grad_emb, None, None, None, None, None, None


def fused_margin_softmax(emb: torch.Tensor, weight: torch.Tensor,
                         index: Optional[torch.Tensor], labels: torch.Tensor,
                         margin: CombinedMarginLoss,
                         record: Optional[SampledRows] = None,
                         workspace: Optional[Workspace] = None
                         ) -> torch.Tensor:
    """Global mean loss of ``emb`` against ``weight`` (or its ``index`` rows).

    Args:
        emb: (N, D) embeddings of the global batch (same on every rank).
        weight: (num_local, D) shard of the centers.
        index: Sorted rows of ``weight`` used this step, or None for all.
        labels: (N,) target position among the used rows, -1 if the target
            lives on another rank.
        margin: The ``CombinedMarginLoss`` (s, margins, filtering).
        record: Where the gradient of the ``index`` rows is stored; with
            ``index`` None the gradient goes to ``weight.grad`` as usual.
        workspace: Reused logit/gradient buffer (None: a new one per call).

    The result equals ``distributed_cross_entropy(margin(cos, labels),
    labels)`` with ``cos`` the clamped cosines, computed as the log-sum-exp
    (no underflow of the target probability).
    """
    return FusedMarginSoftmax.apply(emb, weight, index, labels, margin,
                                    record, workspace)
