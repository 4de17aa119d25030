"""Optim wrappers that know which parameters are rank-local shards.

Stock MMEngine wrappers assume every parameter is replicated. With a sharded
head that is wrong in three places, fixed here:

* gradient clipping: the norm over rank-local shards differs per rank, so the
  clip factor would differ and the replicated backbone would drift; only
  replicated parameters are clipped (the reference clips the backbone only);
* sampled centers (``PartialFCHead`` with ``sample_rate < 1``) have no
  ``.grad`` on ``weight``: their gradient rows are applied after the dense
  step with the group's SGD or Adam(W) rule (see ``sparse_step``);
* fp16 loss scaling: an overflow in one rank's shard must skip the step on
  every rank, otherwise the backbone replicas diverge.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from torch.optim.optimizer import register_optimizer_step_post_hook

from mmpfc.models.utils import (get_rank_and_world_size, is_sharded,
                                sharded_owner)
from mmpfc.registry import OPTIM_WRAPPERS
from mmpfc.utils.compat import grad_scaler_found_inf
from .sparse_step import sparse_step

SparseUpdate = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ShardAwareMixin:
    """Clipping and sparse updates for wrappers holding sharded parameters."""

    def _all_params(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g['params']]

    def _sampling_owners(self) -> list:
        owners = []
        for param in self._all_params():
            owner = sharded_owner(param)
            if owner is not None and getattr(owner, 'samples_centers', False):
                owners.append((param, owner))
        return owners

    def _pop_sparse_updates(self) -> List[SparseUpdate]:
        """``(param, rows, grad)`` for every sampled head, records cleared."""
        updates = []
        for param, owner in self._sampling_owners():
            popped = owner.pop_sampled_gradient()
            if popped is not None:
                updates.append((param, *popped))
        return updates

    def _apply_sparse_updates(self, updates: List[SparseUpdate]) -> None:
        for param, rows, grad in updates:
            sparse_step(self.optimizer, param, rows, grad)

    def _clip_grad(self) -> None:
        """Clip replicated parameters only (identical on every rank)."""
        params = [p for p in self._all_params()
                  if p.requires_grad and p.grad is not None
                  and not is_sharded(p)]
        if params:
            norm = self.clip_func(params, **self.clip_grad_kwargs)
            if norm is not None:
                self.message_hub.update_scalar(f'train/{self.grad_name}',
                                               float(norm))

    def zero_grad(self, **kwargs) -> None:
        super().zero_grad(**kwargs)
        for _, owner in self._sampling_owners():
            owner.clear_sampled_gradient()


@OPTIM_WRAPPERS.register_module()
class PartialFCOptimWrapper(ShardAwareMixin, OptimWrapper):
    """fp32 optim wrapper for models with a sharded / sampled head.

    Example::

        optim_wrapper=dict(type='PartialFCOptimWrapper',
                           optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                                          weight_decay=5e-4),
                           clip_grad=dict(max_norm=5))
    """

    def step(self, **kwargs) -> None:
        updates = self._pop_sparse_updates()
        if self.clip_grad_kwargs:
            self._clip_grad()
        self.optimizer.step(**kwargs)
        self._apply_sparse_updates(updates)


@OPTIM_WRAPPERS.register_module()
class PartialFCAmpOptimWrapper(ShardAwareMixin, AmpOptimWrapper):
    """Mixed precision for a sharded head: fp16 + loss scaling on CUDA.

    On CUDA it is ``AmpOptimWrapper`` (fp16 autocast, dynamic loss scaling)
    with the overflow decision all-reduced over ranks. Without CUDA it runs
    bf16 autocast on the CPU, which needs no loss scaler; ``dtype='float16'``
    there gives CPU fp16 autocast with a CPU ``GradScaler`` (the same
    loss-scaling and overflow-sharing code as on GPUs, e.g. to test it with
    gloo). The head's logits and softmax stay fp32 in every case. The current
    loss scale is logged as ``train/loss_scale``.

    Example::

        optim_wrapper=dict(type='PartialFCAmpOptimWrapper',
                           optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                                          weight_decay=5e-4))
    """

    def __init__(self, loss_scale='dynamic', dtype=None, **kwargs) -> None:
        if torch.cuda.is_available():
            super().__init__(loss_scale=loss_scale, dtype=dtype, **kwargs)
            self.device_type = 'cuda'
            return
        OptimWrapper.__init__(self, **kwargs)
        self.device_type = 'cpu'
        if dtype in ('float16', torch.float16):
            self.cast_dtype = torch.float16
            self._init_cpu_loss_scaler(loss_scale)
            return
        if dtype not in (None, 'bfloat16', torch.bfloat16):
            raise ValueError(
                f'dtype={dtype!r}: on the CPU mixed precision is bfloat16 '
                "(dtype=None or 'bfloat16') or float16 with loss scaling "
                "(dtype='float16')")
        self.cast_dtype = torch.bfloat16
        self.loss_scaler = None
        self._scale_update_param = None

    def _init_cpu_loss_scaler(self, loss_scale) -> None:
        """``AmpOptimWrapper``'s ``loss_scale`` forms, on a CPU scaler."""
        self._scale_update_param = None
        if loss_scale == 'dynamic':
            self.loss_scaler = torch.amp.GradScaler('cpu')
        elif isinstance(loss_scale, (int, float)):
            self._scale_update_param = float(loss_scale)
            self.loss_scaler = torch.amp.GradScaler(
                'cpu', init_scale=float(loss_scale))
        elif isinstance(loss_scale, dict):
            self.loss_scaler = torch.amp.GradScaler('cpu', **loss_scale)
        else:
            raise TypeError(
                "loss_scale must be 'dynamic', a number or a dict of "
                f'GradScaler arguments, got {loss_scale!r}')

    @contextmanager
    def optim_context(self, model: nn.Module):
        with OptimWrapper.optim_context(self, model), torch.autocast(
                self.device_type, dtype=self.cast_dtype):
            yield

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.loss_scaler is None:
            return OptimWrapper.backward(self, loss, **kwargs)
        return super().backward(loss, **kwargs)

    def step(self, **kwargs) -> None:
        updates = self._pop_sparse_updates()
        if self.loss_scaler is None:
            if self.clip_grad_kwargs:
                self._clip_grad()
            self.optimizer.step(**kwargs)
            self._apply_sparse_updates(updates)
            return
        scale = self.loss_scaler.get_scale()
        self.loss_scaler.unscale_(self.optimizer)
        for _, _, grad in updates:
            grad.mul_(1.0 / scale)
        overflow = self._share_overflow(updates)
        if self.clip_grad_kwargs and not overflow:
            self._clip_grad()
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update(self._scale_update_param)
        if not overflow:
            self._apply_sparse_updates(updates)
        self.message_hub.update_scalar('train/loss_scale', scale)

    def _share_overflow(self, updates: List[SparseUpdate]) -> bool:
        """Make every rank skip the step if any rank saw inf/NaN."""
        found = grad_scaler_found_inf(self.loss_scaler, self.optimizer)
        flag = torch.zeros(1, device=self.device_type)
        for value in found.values():
            flag += value.to(flag.device)
        for _, _, grad in updates:
            flag += (~torch.isfinite(grad)).any().float()
        if get_rank_and_world_size()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        flag.clamp_(max=1.0)
        for value in found.values():
            value.copy_(flag.to(value.device).reshape(value.shape))
        return bool(flag.item())

    def state_dict(self) -> dict:
        if self.loss_scaler is None:
            return OptimWrapper.state_dict(self)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        if self.loss_scaler is None:
            state_dict.pop('loss_scaler', None)
            return OptimWrapper.load_state_dict(self, state_dict)
        return super().load_state_dict(state_dict)


def _refuse_unapplied_sampled_gradients(optimizer, args, kwargs) -> None:
    """Fail loudly when a plain optimizer step would skip sampled centers.

    Registered for every torch optimizer: the PartialFC wrappers collect the
    sampled gradients before calling ``optimizer.step``; if some are still
    waiting afterwards, the optimizer was driven by another wrapper and the
    centers would silently never learn.
    """
    for group in optimizer.param_groups:
        for param in group['params']:
            owner = sharded_owner(param)
            if owner is not None and owner.has_sampled_gradient():
                raise RuntimeError(
                    f'{type(owner).__name__} (sample_rate='
                    f'{owner.sample_rate}) has sampled-center gradients that '
                    f'{type(optimizer).__name__}.step() cannot apply: use '
                    "optim_wrapper=dict(type='mmpfc.PartialFCOptimWrapper', "
                    "...) or 'mmpfc.PartialFCAmpOptimWrapper'.")


register_optimizer_step_post_hook(_refuse_unapplied_sampled_gradients)
