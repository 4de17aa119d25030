"""Collectives with gradients, and the softmax cross-entropy over sharded
columns.

Every function works without a process group (world size 1) and with gloo on
CPU or NCCL on GPU.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from mmpfc.utils.compat import all_gather_into, reduce_scatter_into


def get_rank_and_world_size() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    world_size = dist.get_world_size()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    all_gather_into(out, tensor.contiguous())
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather rows; backward sums every rank's gradient of our rows.

    Each rank's loss only sees its own columns of the logits, so the gradient
    of the embeddings is partial on every rank; the true gradient of rank
    ``r``'s rows is the sum over ranks (a reduce-scatter). It is multiplied by
    the world size so that DDP's averaging of the backbone gradients yields
    exactly the gradient of the global mean loss.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch = tensor.shape[0]
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # one reduce-scatter on every backend (gloo: checked on torch 2.11
        # and 2.14), so the CPU tests run the GPU's code
        out = grad.new_empty((ctx.batch, *grad.shape[1:]))
        reduce_scatter_into(out, grad.contiguous())
        return out.mul_(dist.get_world_size())


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks in rank order (differentiable).

    The gradient returned to each rank is ``world_size`` times its share of
    the global gradient (see :class:`_AllGatherWithGrad`).
    """
    if get_rank_and_world_size()[1] == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks in rank order."""
    if get_rank_and_world_size()[1] == 1:
        return tensor
    return _all_gather(tensor)


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce ``tensor`` in place (a no-op without a process group)."""
    if get_rank_and_world_size()[1] > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


class _DistributedCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy whose columns (classes) are split over ranks.

    Forward: all-reduce MAX of the row maxima, all-reduce SUM of the row sums
    of ``exp``; the target logit of a row is read on the one rank that holds
    it (all-reduce SUM). The loss of a row is the log-sum-exp minus the
    target logit, exact however small the target probability (taking
    ``-log p`` would need ``p`` to be representable, and caps the loss where
    it is clamped or underflows). The softmax is computed in
    place in one (N, S) buffer that backward turns into the gradient
    ``(p - onehot) / N``; no dense one-hot is ever built.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        rows = logits.shape[0]
        # at least fp32; clone so the caller's tensor is never modified
        probs = logits.to(torch.promote_types(logits.dtype,
                                              torch.float32)).clone()
        # one (row, column) per row, column 0 where the target lives on
        # another rank (masked): no device read for the target positions
        has_target = labels >= 0
        target = (torch.arange(rows, device=labels.device),
                  labels.clamp_min(0))
        target_logit = probs[target].masked_fill_(~has_target, 0.0) \
            if probs.shape[1] else probs.new_zeros(rows)
        all_reduce_(target_logit)
        row_max = probs.max(dim=1)[0] if probs.shape[1] else \
            probs.new_full((rows, ), -float('inf'))
        all_reduce_(row_max, dist.ReduceOp.MAX)
        probs.sub_(row_max[:, None]).exp_()
        row_sum = probs.sum(dim=1)
        all_reduce_(row_sum)
        probs.div_(row_sum[:, None])
        loss = (row_sum.log() + row_max - target_logit).mean()

        ctx.save_for_backward(probs, has_target, *target)
        ctx.input_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, has_target, *target = ctx.saved_tensors
        grad = probs  # reuse the buffer: this function runs backward once
        if grad.shape[1]:
            grad.index_put_(tuple(target),
                            grad[tuple(target)] - has_target.to(grad.dtype))
        grad.mul_(grad_loss / probs.shape[0])
        return grad.to(ctx.input_dtype), None


def distributed_cross_entropy(logits: torch.Tensor,
                              labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over rows whose classes are sharded.

    Args:
        logits: (N, S) scaled logits of this rank's (sampled) classes; ``N`` is
            the global batch, identical on every rank.
        labels: (N,) column of the target in ``logits``, or -1 when the target
            class lives on another rank.

    Returns:
        The same scalar on every rank: mean over the N rows of -log p_target,
        computed as log-sum-exp minus the target logit.
    """
    return _DistributedCrossEntropy.apply(logits, labels)
