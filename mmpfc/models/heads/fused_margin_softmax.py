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
gradient) are kept as a bit mask of S x N bits. On the CPU, where a read
costs nothing, one ``aminmax`` decides whether any position was clamped
(:data:`BIT_MASK_CLAMP`).

Sub-centers (``num_subcenters=K > 1``, sub-center ArcFace): a row of
``weight`` holds the K sub-centers of one class side by side, (S, K*D). Per
chunk the K cosines of each class are computed in a small temporary; the
buffer keeps their maximum (the class cosine, which the margin sees) and a
uint8 (S, N) map keeps which sub-center gave it. Backward sends each class
gradient to that sub-center only, removes its radial part with that
sub-center's norm, and writes the (S, K*D) gradient into the same buffer
(width ``max(N, K*D)``). K = 1 runs the code without any of this.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from mmpfc.utils.compat import storage_use_count

from ..losses import BaseMargin, MarginBatch
# CHUNK_BYTES is re-exported: the budget the chunks below are cut to
from ..utils.chunks import CHUNK_BYTES, rows_per_chunk  # noqa: F401
from ..utils.distributed import all_reduce_
from .sampled_gradients import SampledRows

NORM_EPS = 1e-12  # as F.normalize
#: By device type: keep the clamped positions as a bit mask (True, the
#: default: no device read) or find them with ``aminmax`` + ``nonzero``.
BIT_MASK_CLAMP = {'cpu': False}
#: Logits whose clamp mask is made or applied at a time (bounds the
#: temporaries of the bit mask to a few bytes per element of a block).
MASK_BLOCK = 2**22
_BIT_WEIGHTS: dict = {}  # device -> (1, 2, 4, ..., 128) as uint8
#: Sub-centers per class at most (the arg-max is kept as uint8).
MAX_SUBCENTERS = 255


def _bit_weights(device: torch.device) -> torch.Tensor:
    weights = _BIT_WEIGHTS.get(device)
    if weights is None:  # made on the device: no host-to-device copy
        weights = torch.bitwise_left_shift(
            torch.ones(8, dtype=torch.uint8, device=device),
            torch.arange(8, dtype=torch.uint8, device=device))
        _BIT_WEIGHTS[device] = weights
    return weights


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(R, N) bool -> (R, ceil(N / 8)) uint8; bit ``j % 8`` of byte
    ``j // 8`` of a row is ``mask[row, j]``."""
    rows, width = mask.shape
    pad = (-width) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(rows, pad)], dim=1)
    weights = _bit_weights(mask.device)
    return (mask.view(rows, -1, 8).to(torch.uint8) * weights).sum(
        dim=2, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """The (R, ``width``) bool mask that :func:`pack_bits` packed."""
    weights = _bit_weights(bits.device)
    mask = (bits.unsqueeze(2) & weights).ne(0)
    return mask.view(bits.shape[0], -1)[:, :width]


def _row_blocks(rows: int, width: int) -> Iterator[slice]:
    step = max(1, MASK_BLOCK // max(1, width))
    for start in range(0, rows, step):
        yield slice(start, start + step)


def pack_clamped(cos: torch.Tensor, bits: torch.Tensor,
                 bound: float = 1.0) -> None:
    """Write into ``bits`` where the (R, N) ``cos`` lies outside
    [-bound, bound]."""
    for rows in _row_blocks(cos.shape[0], cos.shape[1]):
        block = cos[rows]
        bits[rows] = pack_bits((block < -bound) | (block > bound))


def zero_clamped(grad: torch.Tensor, bits: torch.Tensor) -> None:
    """Zero the entries of the (R, N) ``grad`` that ``bits`` marks."""
    width = grad.shape[1]
    for rows in _row_blocks(grad.shape[0], width):
        grad[rows].masked_fill_(unpack_bits(bits[rows], width), 0.0)


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
    """True for a :class:`BaseMargin` that keeps the stock ``forward`` (a
    margin that overrides it asks for the plain composition)."""
    return (isinstance(margin, BaseMargin)
            and type(margin).forward is BaseMargin.forward)


def chunk_rows(num_rows: int, width: int, device: torch.device,
               itemsize: int = 4) -> int:
    """Rows per chunk so that a chunk of ``width`` columns fits the budget."""
    return max(1, min(num_rows, rows_per_chunk(width * itemsize, device)))


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


class FusedMarginSoftmax(torch.autograd.Function):
    """Mean margin-softmax loss of (N, D) embeddings over sharded centers."""

    @staticmethod
    def forward(ctx, emb: torch.Tensor, weight: torch.Tensor,
                index: Optional[torch.Tensor], labels: torch.Tensor,
                margin: BaseMargin,
                record: Optional[SampledRows],
                workspace: Optional[Workspace],
                subs: int = 1) -> torch.Tensor:
        num, dtype = emb.shape[0], emb.dtype
        check_subcenters(weight, emb, subs)
        emb_norm = torch.linalg.vector_norm(emb, dim=1).clamp_min_(NORM_EPS)
        emb_n = emb / emb_norm[:, None]
        total = weight.shape[0] if index is None else index.numel()
        # a chunk of K-wide rows and its (chunk*K, N) cosines fit the budget
        size = chunk_rows(total, subs * max(emb.shape[1], num), emb.device,
                          emb.element_size())
        # a record takes the rows' fp32 gradient (sampled rows, or every
        # row of a 16-bit shard); otherwise autograd's weight.grad does
        need_w = (record is not None or
                  (index is None and ctx.needs_input_grad[1]))
        # logits transposed, (S, N): a chunk of centers is a block of rows.
        # Backward writes the (S, D) (or (S, K*D)) center gradient into
        # the same buffer.
        width = max(num, weight.shape[1]) if need_w else num
        buffer = (workspace.take(total * width, emb) if workspace is not None
                  else emb.new_empty(total * width))
        logits = buffer[:total * num].view(total, num)
        # the norm of every used center (sub-center), (S,) or (S, K)
        w_norm = emb.new_empty(total) if subs == 1 else emb.new_empty(
            total, subs)
        # with sub-centers: which one gave the class cosine, (S, N)
        arg = None if subs == 1 else torch.empty(
            (total, num), dtype=torch.uint8, device=emb.device)
        # outside [-1, 1] by rounding only (or the margin's tighter
        # bound): clamp, and no gradient there
        bound = margin.cos_bound
        bits = None
        if total and BIT_MASK_CLAMP.get(emb.device.type, True):
            bits = torch.empty((total, (num + 7) // 8), dtype=torch.uint8,
                               device=emb.device)
        for start, stop in _spans(total, size):
            rows = _rows(weight, index, start, stop, dtype)
            if subs == 1:
                torch.linalg.vector_norm(rows, dim=1, out=w_norm[start:stop])
                cos = torch.mm(rows, emb_n.t(), out=logits[start:stop])
                cos.mul_(w_norm[start:stop].clamp_min(
                    NORM_EPS).reciprocal()[:, None])
            else:
                cos = _max_subcenter_cosines(rows, emb_n, w_norm[start:stop],
                                             logits[start:stop],
                                             arg[start:stop])
            if bits is not None:
                pack_clamped(cos, bits[start:stop], bound)
                cos.clamp_(-bound, bound)
        clamped = None
        if total and bits is None:
            low, high = torch.aminmax(logits)
            if low < -bound or high > bound:
                clamped = ((logits < -bound) | (logits > bound)).nonzero(
                    as_tuple=True)
            logits.clamp_(-bound, bound)

        # one (row, column) per column: its target's row, row 0 where the
        # target is on another rank (read, but never changed)
        has_target = labels >= 0
        target = None
        if total:
            target = (labels.clamp_min(0),
                      torch.arange(num, device=labels.device))
        # every row's target cosine, from the rank that holds it (one
        # all-reduce of N values): the margin sees the whole global batch
        cos_t = emb.new_zeros(num) if target is None else \
            logits[target].masked_fill_(~has_target, 0.0)
        all_reduce_(cos_t)
        norms = emb_norm if margin.uses_norms else None
        margin.begin_step(MarginBatch(cos_t, norms))
        terms = _TargetTerms(margin, cos_t, norms)
        logit_t = terms.logit
        filtered = None
        if margin.interclass_filtering_threshold > 0:
            filtered = logits > margin.interclass_filtering_threshold
            if target is not None:  # the target column is never filtered
                filtered.index_put_(target, filtered[target] & ~has_target)
            logits.masked_fill_(filtered, 0.0)
        non_target_slope = None
        if margin.modifies_non_target and total:
            # d logit / d cos of every non-target entry, for backward;
            # the targets' own slope is the terms' (1 here: kept as is)
            non_target_slope = torch.empty_like(logits)
            for start, stop in _spans(total, size):
                margin.apply_non_target_(logits[start:stop], cos_t[None, :],
                                         non_target_slope[start:stop])
            if target is not None:
                non_target_slope.index_put_(target, torch.where(
                    has_target, torch.ones_like(cos_t),
                    non_target_slope[target]))
        scale = margin.s
        if target is not None:
            logits.index_put_(target,
                              torch.where(has_target, logit_t,
                                          logits[target]))
        logits.mul_(scale)

        # softmax over the columns of every rank: max, exp, sum
        row_max = logits.amax(dim=0) if total else emb.new_full(
            (num, ), -float('inf'))
        all_reduce_(row_max, dist.ReduceOp.MAX)
        row_sum = logits.sub_(row_max).exp_().sum(dim=0)
        all_reduce_(row_sum)
        row_loss = row_sum.log() + row_max - scale * logit_t
        if terms.extra is not None:
            row_loss += terms.extra
        loss = row_loss.mean()

        ctx.buffer, ctx.clamped, ctx.filtered = buffer, clamped, filtered
        ctx.bits, ctx.need_w, ctx.arg = bits, need_w, arg
        ctx.non_target_slope = non_target_slope
        ctx.target, ctx.has_target = target, has_target
        ctx.terms, ctx.size, ctx.margin = terms, size, margin
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
        (total, num), dim = (w_norm.shape[0], emb_n.shape[0]), emb_n.shape[1]
        arg = ctx.arg
        scale, buffer, need_w = ctx.scale, ctx.buffer, ctx.need_w
        need_e = ctx.needs_input_grad[0]
        grad = buffer[:total * num].view(total, num)
        # d loss / d logit = (p - onehot) * grad_loss / N, p = exp / row_sum;
        # through the margin: times s, and at the target times its slope
        factor = grad_loss / num
        if target is not None:
            prob_t = grad[target] / ctx.row_sum
        grad.mul_((factor * scale) / ctx.row_sum)
        if target is not None:
            grad_t = (prob_t - 1.0) * factor * scale * ctx.terms.slope
            grad.index_put_(target, torch.where(ctx.has_target, grad_t,
                                                grad[target]))
        if ctx.filtered is not None:
            grad.masked_fill_(ctx.filtered, 0.0)
        if ctx.clamped is not None:  # positions (CPU), no device read
            grad[ctx.clamped] = 0.0
        bits = ctx.bits
        inv_norm = w_norm.clamp_min(NORM_EPS).reciprocal_()
        if arg is None:
            grad.mul_(inv_norm[:, None])  # d loss / d (w . e_n)

        # The (S, W) gradient (W = D, or K*D with sub-centers) overwrites
        # the (S, N) logits in place: block [a, b) is written to elements
        # [a*W, b*W), after every logit row it could overwrite is used
        # (rows in descending order when N <= W, ascending otherwise); a
        # block overlapping its own logits goes through a small temporary.
        width = weight.shape[1]  # D, or K*D with sub-centers
        grad_w = buffer[:total * width].view(total, width) if need_w \
            else None
        grad_e = torch.zeros_like(emb_n) if need_e else None
        spans = list(_spans(total, ctx.size))
        for start, stop in (reversed(spans) if num <= width else spans):
            rows = _rows(weight, index, start, stop, emb_n.dtype)
            if arg is not None:
                _subcenter_backward_block(ctx, grad, rows, emb_n, inv_norm,
                                          w_norm, arg, grad_w, grad_e, start,
                                          stop)
                continue
            block = grad[start:stop]
            if bits is not None:  # clamped cosines: no gradient
                zero_clamped(block, bits[start:stop])
            if ctx.non_target_slope is not None:
                block.mul_(ctx.non_target_slope[start:stop])
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
        ctx.buffer = ctx.filtered = ctx.record = ctx.bits = ctx.arg = None
        ctx.non_target_slope = None
        ctx.margin = None
        grad_emb = None
        if need_e:
            radial = (grad_e * emb_n).sum(dim=1, keepdim=True)
            radial.masked_fill_(emb_norm[:, None] <= NORM_EPS, 0)
            grad_emb = grad_e.sub_(radial * emb_n).div_(emb_norm[:, None])
            if target is not None:  # the radial part of a norm-based margin
                norm_grad = ctx.terms.norm_gradient(prob_t, scale, factor)
                if norm_grad is not None:
                    # counted on the rank that holds the row's target
                    keep = ctx.has_target & (emb_norm > NORM_EPS)
                    grad_emb.addcmul_(emb_n, torch.where(
                        keep, norm_grad, torch.zeros_like(norm_grad))[:,
                                                                      None])
        if record is None:
            if grad_w is not None:
                grad_w = grad_w.to(ctx.weight_dtype)
            return grad_emb, grad_w, None, None, None, None, None, None
        if grad_w is not None:
            record.grad = grad_w if record.grad is None else \
                record.grad.add_(grad_w)
        return grad_emb, None, None, None, None, None, None, None


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


def _max_subcenter_cosines(rows: torch.Tensor, emb_n: torch.Tensor,
                           w_norm: torch.Tensor, out: torch.Tensor,
                           arg: torch.Tensor) -> torch.Tensor:
    """Class cosines of a chunk of (c, K*D) rows into ``out`` (c, N): the
    largest of each class's K sub-center cosines; which one into ``arg``
    (uint8) and the sub-center norms into ``w_norm`` (c, K)."""
    count, subs = w_norm.shape
    sub = rows.reshape(count * subs, -1)
    norm = torch.linalg.vector_norm(sub, dim=1)
    w_norm.copy_(norm.view(count, subs))
    cos = torch.mm(sub, emb_n.t())  # (c*K, N): a chunk-sized temporary
    cos.mul_(norm.clamp_min_(NORM_EPS).reciprocal_()[:, None])
    best, which = cos.view(count, subs, -1).max(dim=1)
    arg.copy_(which)
    return out.copy_(best)


def _subcenter_backward_block(ctx, grad: torch.Tensor, rows: torch.Tensor,
                              emb_n: torch.Tensor, inv_norm: torch.Tensor,
                              w_norm: torch.Tensor, arg: torch.Tensor,
                              grad_w: Optional[torch.Tensor],
                              grad_e: Optional[torch.Tensor], start: int,
                              stop: int) -> None:
    """Backward of rows ``[start, stop)`` with sub-centers: d loss / d cos
    of a class (in ``grad``) goes to its arg-max sub-center only.

    The block's logits are read into a (c*K, N) temporary before its
    gradient is written over them; the chunk order of the caller keeps the
    other blocks' logits intact.
    """
    count, subs = stop - start, inv_norm.shape[1]
    block = grad[start:stop]
    which = arg[start:stop].long()
    if ctx.bits is not None:  # clamped cosines: no gradient
        zero_clamped(block, ctx.bits[start:stop])
    sub = rows.reshape(count * subs, -1)
    inv = inv_norm[start:stop].reshape(-1)
    if ctx.non_target_slope is not None:
        block.mul_(ctx.non_target_slope[start:stop])
    # d loss / d (w_k . e_n), zero for every sub-center but the arg-max
    routed = block.new_zeros(count, subs, block.shape[1])
    routed.scatter_(1, which.unsqueeze(1), block.unsqueeze(1))
    routed = routed.view(count * subs, -1).mul_(inv[:, None])
    if grad_e is not None:
        grad_e.addmm_(routed.t(), sub)
    if grad_w is not None:
        out = torch.mm(routed, emb_n,
                       out=grad_w[start:stop].view(count * subs, -1))
        # remove the radial part of each sub-center, with its own norm
        coef = (out * sub).sum(dim=1).mul_(inv * inv).neg_()
        coef.masked_fill_(w_norm[start:stop].reshape(-1) <= NORM_EPS, 0)
        out.addcmul_(sub, coef[:, None])


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
