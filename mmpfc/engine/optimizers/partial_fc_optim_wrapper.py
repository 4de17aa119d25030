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

``center_state_dtype`` keeps the optimizer state of the sharded centers
compact (:mod:`.center_state`): the wrapper then updates those centers with
its row rules (every row in model parallel), and loads their state without
torch's cast to the parameter's dtype.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import OptimWrapper

from mmpfc.models.heads.sharded_head import ShardedHead
from mmpfc.models.utils import (get_rank_and_world_size, is_sharded,
                                sharded_owner)
from mmpfc.models.utils.low_precision import dtype_name
from mmpfc.models.utils.sharding import split_state
from mmpfc.registry import OPTIM_WRAPPERS
from mmpfc.utils.arg_checks import (AnyOf, Instance, OneOf, Opt, Parsed, Real,
                                    Str, arg_specs)
from mmpfc.utils.compat import grad_scaler_found_inf, grad_scaler_scale

from .center_state import ROW_STATES, parse_state_dtype, to_form
from .sparse_step import SPARSE_RULES, sparse_rule, sparse_step

SparseUpdate = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
#: The form of the centers' optimizer state, for both wrappers.
CENTER_STATE_DTYPE = Parsed(parse_state_dtype, wrong=['fp8', 8])


class ShardAwareMixin:
    """Clipping and sparse updates for wrappers holding sharded parameters."""

    center_state_dtype = 'float32'

    def _init_shard_aware(self, center_state_dtype: str) -> None:
        """Check and keep the form of the centers' optimizer state, and tell
        the heads updated by rows that this wrapper applies their gradients
        (without one, a head refuses the step after an unapplied one)."""
        self._init_center_state(center_state_dtype)
        for _, owner in self._row_owners():
            owner.expect_row_updates()

    def _init_center_state(self, center_state_dtype: str) -> None:
        """A compact form needs an optimizer that updates by rows, which
        only the built optimizer can tell."""
        self.center_state_dtype = parse_state_dtype(center_state_dtype)
        if (self.center_state_dtype != 'float32'
                and sparse_rule(self.optimizer) is None):
            names = ', '.join(cls.__name__ for cls, _ in SPARSE_RULES)
            raise ValueError(
                f'{type(self).__name__}: '
                f'center_state_dtype={center_state_dtype!r} needs an '
                f'optimizer with a row rule ({names}), got '
                f'{type(self.optimizer).__name__}: use one of those or '
                "center_state_dtype='float32'")

    def _all_params(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g['params']]

    def _sharded_owners(self) -> list:
        owners = []
        for param in self._all_params():
            owner = sharded_owner(param)
            if isinstance(owner, ShardedHead):
                owners.append((param, owner))
        return owners

    def _row_owners(self) -> list:
        """Heads whose rows this wrapper updates from their records."""
        return [(param, owner) for param, owner in self._sharded_owners()
                if owner.row_updates]

    def _pop_sparse_updates(self) -> List[SparseUpdate]:
        """``(param, rows, grad)`` for every head updated by rows, records
        cleared; with a compact state also the dense ``.grad`` of sharded
        rows (taken off the parameter, so the optimizer skips it)."""
        updates = []
        for param, owner in self._sharded_owners():
            if owner.row_updates:
                popped = owner.pop_sampled_gradient()
                if popped is not None:
                    updates.append((param, *popped))
            elif (self.center_state_dtype != 'float32'
                  and param.grad is not None):
                rows = torch.arange(param.shape[0], device=param.device)
                updates.append((param, rows, param.grad))
                param.grad = None
        return updates

    def _apply_sparse_updates(self, updates: List[SparseUpdate]) -> None:
        for param, rows, grad in updates:
            owner = sharded_owner(param)
            rounding = (owner.round_rows if isinstance(owner, ShardedHead)
                        else None)
            sparse_step(self.optimizer, param, rows, grad,
                        self.center_state_dtype, rounding)

    def _load_keeping_center_state(self, state_dict: dict,
                                   load: Callable[[dict], None]) -> None:
        """``load(state_dict)``, with the centers' row-wise state put back
        as saved and then converted to ``center_state_dtype``.

        torch's ``Optimizer.load_state_dict`` casts every state tensor to
        its parameter's dtype: int8 codes, fp32 block scales of a 16-bit
        shard and Adam's float64 ``row_step`` would change value.
        """
        state_dict = dict(state_dict, state=dict(state_dict.get('state', {})))
        kept = self._take_center_state(state_dict)
        load(state_dict)
        converted = {}
        params = self._all_params()
        for index, entries in kept.items():
            param = params[index]
            state = self.optimizer.state[param]
            for key, value in entries.items():
                state[key] = value.to(param.device)
            for key in ROW_STATES:
                if key in state:
                    change = to_form(state, key, self.center_state_dtype)
                    converted.update({f'param {index} {k}': v
                                      for k, v in change.items()})
        if converted:
            print_log(
                'Optimizer state of the centers converted to '
                f'center_state_dtype={self.center_state_dtype!r}: '
                f'{converted}', logger='current', level=logging.INFO)

    def _take_center_state(self, state_dict: dict
                           ) -> Dict[int, Dict[str, torch.Tensor]]:
        """Remove the row-wise state of sharded parameters from
        ``state_dict['state']`` (index -> entries)."""
        state = state_dict.get('state', {})
        kept = {}
        for index, param in enumerate(self._all_params()):
            if not is_sharded(param) or index not in state:
                continue
            rows, rest = split_state(state[index], param.shape[0])
            if rows:
                kept[index] = rows
                state[index] = rest
        return kept

    def _plain_step(self, updates: List[SparseUpdate], **kwargs) -> None:
        """An unscaled step: clip, the optimizer, then the row updates."""
        if self.clip_grad_kwargs:
            self._clip_grad()
        self.optimizer.step(**kwargs)
        self._apply_sparse_updates(updates)

    def _clip_params(self) -> Optional[torch.Tensor]:
        """Clip replicated parameters only (identical on every rank).

        Returns what the clip function returns (the total norm for
        ``clip_grad_norm_``, None for ``clip_grad_value_``), not read.
        """
        params = [p for p in self._all_params()
                  if p.requires_grad and p.grad is not None
                  and not is_sharded(p)]
        if not params:
            return None
        if self.clip_func is torch.nn.utils.clip_grad_norm_ and any(
                p.grad.dtype == torch.float16 for p in params):
            return self._clip_norm_in_fp32(params)
        return self.clip_func(params, **self.clip_grad_kwargs)

    def _clip_norm_in_fp32(self, params: List[torch.Tensor]) -> torch.Tensor:
        """``clip_grad_norm_`` with the norm taken in fp32: torch takes an
        fp16 gradient's norm in fp16, which is inf past 65504 (the clip
        would then zero every gradient)."""
        kwargs = self.clip_grad_kwargs
        norm_type = float(kwargs.get('norm_type', 2.0))
        total = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(p.grad, norm_type, dtype=torch.float32)
            for p in params]), norm_type)
        if kwargs.get('error_if_nonfinite') and not torch.isfinite(total):
            raise RuntimeError(
                f'The total norm of order {norm_type} for gradients is '
                'non-finite, so it cannot be clipped '
                '(clip_grad=dict(error_if_nonfinite=True))')
        torch.nn.utils.clip_grads_with_norm_(params, kwargs['max_norm'],
                                             total,
                                             foreach=kwargs.get('foreach'))
        return total

    def _clip_grad(self) -> None:
        """Clip replicated parameters and log the norm (reads it: a sync)."""
        norm = self._clip_params()
        if norm is not None:
            self.message_hub.update_scalar(f'train/{self.grad_name}',
                                           float(norm))

    def zero_grad(self, **kwargs) -> None:
        super().zero_grad(**kwargs)
        for _, owner in self._row_owners():
            owner.clear_sampled_gradient()


@OPTIM_WRAPPERS.register_module()
@arg_specs(center_state_dtype=CENTER_STATE_DTYPE)
class PartialFCOptimWrapper(ShardAwareMixin, OptimWrapper):
    """fp32 optim wrapper for models with a sharded / sampled head.

    Example::

        optim_wrapper=dict(type='PartialFCOptimWrapper',
                           optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                                          weight_decay=5e-4),
                           clip_grad=dict(max_norm=5),
                           center_state_dtype='int8')

    Args:
        center_state_dtype: Form of the sharded centers' optimizer state:
            ``'float32'`` (default), ``'bfloat16'`` or ``'int8'``
            (block-wise, :mod:`.center_state`). Other parameters keep the
            optimizer's own state.
    """

    def __init__(self, *args, center_state_dtype: str = 'float32',
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_shard_aware(center_state_dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        self._load_keeping_center_state(state_dict, super().load_state_dict)

    def step(self, **kwargs) -> None:
        self._plain_step(self._pop_sparse_updates(), **kwargs)


@OPTIM_WRAPPERS.register_module()
@arg_specs(loss_scale=AnyOf(OneOf('dynamic'), Real(low=0.0, low_open=True),
                            Instance(dict)),
           dtype=Opt(AnyOf(Str(), Instance(torch.dtype))),
           center_state_dtype=CENTER_STATE_DTYPE)
class PartialFCAmpOptimWrapper(ShardAwareMixin, OptimWrapper):
    """Mixed precision for a sharded head, on the device of its parameters.

    The device type comes from the parameters of ``optimizer`` (all must be
    on one device type), never from ``torch.cuda.is_available()``: a CPU
    model on a GPU machine gets CPU autocast. On CUDA it is fp16 autocast
    with dynamic loss scaling (``AmpOptimWrapper``'s ``loss_scale`` forms)
    and the overflow decision all-reduced over ranks; ``dtype='bfloat16'``
    autocasts to bf16 with the same scaler. On the CPU it runs bf16 autocast,
    which needs no loss scaler; ``dtype='float16'`` there gives CPU fp16
    autocast with a CPU ``GradScaler`` (the same loss-scaling and
    overflow-sharing code as on GPUs, e.g. to test it with gloo). The head's
    logits and softmax stay fp32 in every case. The current loss scale is
    logged as ``train/loss_scale``.

    It takes the arguments of MMEngine's ``AmpOptimWrapper`` (whose
    ``__init__`` accepts CUDA-like devices only) and saves the loss scaler's
    state under the same ``'loss_scaler'`` key. A loss-scaled step reads the
    device once: the shared overflow flag, the
    scale used and the gradient norm (with ``clip_grad``) come back in one
    copy; an overflowed step skips the optimizer, as ``GradScaler.step``
    does.

    Example::

        optim_wrapper=dict(type='PartialFCAmpOptimWrapper',
                           optimizer=dict(type='SGD', lr=0.1, momentum=0.9,
                                          weight_decay=5e-4))
    """

    #: device type -> (default autocast dtype, dtypes allowed there)
    DTYPES = {
        'cuda': (torch.float16, (torch.float16, torch.bfloat16)),
        'cpu': (torch.bfloat16, (torch.bfloat16, torch.float16)),
    }

    def __init__(self, loss_scale='dynamic', dtype=None,
                 center_state_dtype: str = 'float32', **kwargs) -> None:
        super().__init__(**kwargs)
        self._init_shard_aware(center_state_dtype)
        self.device = params_device(self.optimizer)
        self.device_type = self.device.type
        if self.device_type not in self.DTYPES:
            raise ValueError(
                f'PartialFCAmpOptimWrapper supports parameters on '
                f'{sorted(self.DTYPES)}, got {self.device_type!r}')
        self.cast_dtype = self._cast_dtype(dtype)
        self._scale_update_param = None
        self.loss_scaler = None
        # bf16 on the CPU has fp32's range: no loss scaling
        if self.device_type == 'cuda' or self.cast_dtype == torch.float16:
            self.loss_scaler = self._build_loss_scaler(loss_scale)

    def _cast_dtype(self, dtype) -> torch.dtype:
        """The autocast dtype for ``dtype`` (None, a name or a dtype)."""
        default, allowed = self.DTYPES[self.device_type]
        if dtype is None:
            return default
        cast = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if cast not in allowed:
            names = ' or '.join(repr(dtype_name(d)) for d in allowed)
            raise ValueError(
                f'{type(self).__name__}: dtype={dtype!r}: on the '
                f'{self.device_type.upper()} mixed '
                f'precision is {names} (dtype=None: '
                f'{dtype_name(default)!r}); on the CPU '
                "bfloat16 needs no loss scaling and float16 is loss-scaled")
        return cast

    def _build_loss_scaler(self, loss_scale) -> torch.amp.GradScaler:
        """``AmpOptimWrapper``'s ``loss_scale`` forms, on this device:
        'dynamic', a number or a dict of ``GradScaler`` arguments."""
        device = self.device_type
        if loss_scale == 'dynamic':
            return torch.amp.GradScaler(device)
        if isinstance(loss_scale, dict):
            return torch.amp.GradScaler(device, **loss_scale)
        self._scale_update_param = float(loss_scale)
        return torch.amp.GradScaler(device, init_scale=float(loss_scale))

    @contextmanager
    def optim_context(self, model: nn.Module):
        with super().optim_context(model), torch.autocast(
                self.device_type, dtype=self.cast_dtype):
            yield

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.loss_scaler is not None:
            loss = self.loss_scaler.scale(loss)
        super().backward(loss, **kwargs)

    def step(self, **kwargs) -> None:
        updates = self._pop_sparse_updates()
        if self.loss_scaler is None:
            return self._plain_step(updates, **kwargs)
        scale = grad_scaler_scale(self.loss_scaler)
        narrow = self._pop_16bit_grads()
        self.loss_scaler.unscale_(self.optimizer)
        inv_scale = scale.double().reciprocal().float()  # as unscale_
        by_hand = [g for _, _, g in updates] + [g for _, g in narrow]
        for grad in by_hand:
            grad.mul_(inv_scale.to(grad.device))
        for param, grad in narrow:
            param.grad = grad
        flag = self._share_overflow(by_hand)
        norm = None
        if self.clip_grad_kwargs:
            # clipped before the decision is read; an overflowed step is
            # skipped anyway and its norm is not logged
            norm = self._clip_params()
        # the one device read of the step: overflow, scale, norm
        values = [flag.reshape(()), scale.reshape(()).to(flag)]
        if torch.is_tensor(norm):
            values.append(norm.reshape(()).to(flag))
        host = torch.stack(values).tolist()
        overflow = host[0] > 0
        if not overflow:
            # the gradients are unscaled: what GradScaler.step would run
            self.optimizer.step(**kwargs)
            self._apply_sparse_updates(updates)
            if len(host) > 2:
                self.message_hub.update_scalar(f'train/{self.grad_name}',
                                               host[2])
        self.loss_scaler.update(self._scale_update_param)
        self.message_hub.update_scalar('train/loss_scale', host[1])

    def _pop_16bit_grads(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(param, grad) of dense fp16 / bf16 gradients, taken off their
        parameters: ``GradScaler.unscale_`` refuses fp16 gradients and its
        CUDA kernel has no bf16 (e.g. a replicated head's 16-bit centers);
        they are unscaled and checked with the row updates instead."""
        narrow = []
        for param in self._all_params():
            grad = param.grad
            if grad is not None and grad.dtype in (torch.float16,
                                                   torch.bfloat16):
                narrow.append((param, grad))
                param.grad = None
        return narrow

    def _share_overflow(self, by_hand: Sequence[torch.Tensor]
                        ) -> torch.Tensor:
        """Make every rank skip the step if any rank saw inf/NaN (in the
        gradients the scaler unscaled, or in ``by_hand``: the row updates'
        and the 16-bit ones, unscaled beside it).

        Returns the shared flag (1 element, 1.0 on overflow) on the device,
        without reading it; the scaler's per-device flags are overwritten
        with it, so ``loss_scaler.update`` backs off on every rank.
        """
        found = grad_scaler_found_inf(self.loss_scaler, self.optimizer)
        flag = torch.zeros(1, device=self.device)
        for value in found.values():
            flag += value.to(flag.device)
        for grad in by_hand:
            flag += (~torch.isfinite(grad)).any().float().to(flag.device)
        if get_rank_and_world_size()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        flag.clamp_(max=1.0)
        for value in found.values():
            value.copy_(flag.to(value.device).reshape(value.shape))
        if not found:
            # no replicated parameter had a gradient (a frozen backbone):
            # unscale_ recorded no flag, and the scaler's update needs one
            found[flag.device] = flag.clone()
        return flag

    def state_dict(self) -> dict:
        state_dict = super().state_dict()
        if self.loss_scaler is not None:
            state_dict['loss_scaler'] = self.loss_scaler.state_dict()
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        scaler_state = state_dict.pop('loss_scaler', None)
        if self.loss_scaler is not None and scaler_state is not None:
            self.loss_scaler.load_state_dict(scaler_state)
        self._load_keeping_center_state(state_dict, super().load_state_dict)


def params_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """The one device that holds every parameter of ``optimizer``.

    Raises ValueError, naming the devices, when the parameters are spread
    over several device types (autocast and the loss scaler are per device
    type) or when there are none.
    """
    devices = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            devices.setdefault(param.device.type, param.device)
    if len(devices) != 1:
        raise ValueError(
            'PartialFCAmpOptimWrapper needs every parameter of the optimizer '
            f'on one device type, got {sorted(devices) or "no parameters"}: '
            'move the whole model (model.to(device)) before building the '
            'optimizer')
    return next(iter(devices.values()))
