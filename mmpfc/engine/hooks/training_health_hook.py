"""Stop a run whose loss, gradients or weights stop being finite.

A too-large learning rate gives ``nan`` from the second step on; without a
guard the run exits 0 and keeps saving checkpoints of NaN weights, which
rotate the good ones out (``max_keep_ckpts``) and become ``last_checkpoint``.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.hooks import Hook

from mmpfc.checkpoint import unwrap_model
from mmpfc.registry import HOOKS
from mmpfc.utils.arg_checks import Int, OneOf, Opt, Real, arg_specs

ACTIONS = ('stop', 'warn')
LIKELY_CAUSES = (
    'a learning rate too high for the batch size (lower optim_wrapper.'
    'optimizer.lr or lengthen the warmup), fp16 without loss scaling '
    '(use --amp, which scales the loss), labels or images that are not '
    'what the model expects, or a margin/scale the embeddings cannot reach')


class TrainingDivergedError(RuntimeError):
    """The run stopped because its loss, gradients or weights are not
    finite (raised on every rank at the same iteration)."""


def nonfinite_parameters(module: nn.Module, limit: int = 5) -> List[str]:
    """Names of up to ``limit`` parameters holding a NaN or an inf.

    One float64 sum per parameter: a NaN or an inf makes it non-finite,
    while finite fp32/fp16 values cannot overflow it, and no temporary of
    the parameter's size is made (a shard can be gigabytes).
    """
    bad = []
    for name, param in module.named_parameters():
        total = param.detach().sum(dtype=torch.float64)
        if not bool(torch.isfinite(total)):
            bad.append(name)
            if len(bad) == limit:
                break
    return bad


def nonfinite_weights(model: nn.Module) -> Tuple[List[str], bool]:
    """This rank's non-finite parameters (up to 5 names), and whether any
    rank has one (a collective: call it on every rank)."""
    bad = nonfinite_parameters(model)
    return bad, any_rank(bool(bad), _device_of(model.parameters()))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any rank (a collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or \
            dist.get_world_size() == 1:
        return flag
    box = torch.tensor([float(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def gather_floats(value: float, device: torch.device) -> List[float]:
    """``value`` of every rank, in rank order (a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    box = torch.tensor([value], dtype=torch.float64, device=device)
    boxes = [torch.empty_like(box) for _ in range(dist.get_world_size())]
    dist.all_gather(boxes, box)
    return [float(b.item()) for b in boxes]


@HOOKS.register_module()
@arg_specs(patience=Int(low=1), action=OneOf(*ACTIONS),
           min_loss_scale=Opt(Real(low=0.0, low_open=True)))
class TrainingHealthHook(Hook):
    """Stop training on every rank when it stops being finite.

    After each iteration every rank checks its loss (and the gradient norm
    the optim wrapper logs when it clips); the result is reduced over ranks,
    so all ranks stop at the same iteration. When a loss is not finite, the
    weights are checked too: non-finite weights cannot recover and stop the
    run at once whatever ``action`` says. Non-finite losses with finite
    weights (e.g. an fp16 step that the loss scaler skipped) count against
    ``patience``. An fp16 loss scale below ``min_loss_scale`` means the
    scaler skips every step: it is reported the same way.

    Its priority (``ABOVE_NORMAL``) runs it before ``CheckpointHook``, so a
    stopped run writes no checkpoint of the bad step and rotates none of the
    good ones out. ``PartialFCRunner.save_checkpoint`` also refuses
    non-finite weights, for runs without this hook.

    Example (``configs/_base_/default_runtime.py`` turns it on)::

        custom_hooks = [dict(type='TrainingHealthHook', patience=1,
                             action='stop', min_loss_scale=1e-4)]

    Args:
        patience: Consecutive non-finite iterations (with finite weights)
            tolerated before ``action``.
        action: ``'stop'`` raises :class:`TrainingDivergedError` on every
            rank; ``'warn'`` logs and goes on (non-finite weights still stop).
        min_loss_scale: Floor of the fp16 loss scale; None disables the check.
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self, patience: int = 1, action: str = 'stop',
                 min_loss_scale: Optional[float] = 1e-4) -> None:
        self.patience = patience
        self.action = action
        self.min_loss_scale = min_loss_scale
        self.bad_iters = 0

    def before_train(self, runner) -> None:
        self.bad_iters = 0

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Sequence] = None,
                         outputs: Optional[dict] = None) -> None:
        model = unwrap_model(runner.model)
        device = _device_of(model.parameters())
        losses = _losses(outputs)
        local_bad = not all(math.isfinite(v) for v in losses.values())
        grad_norm = _logged(runner, 'train/grad_norm')
        local_bad |= grad_norm is not None and not math.isfinite(grad_norm)
        step = runner.iter + 1
        if any_rank(local_bad, device):
            self._on_nonfinite(runner, model, device, step, losses,
                               grad_norm)
        else:
            self.bad_iters = 0
        self._check_loss_scale(runner, step)

    def _on_nonfinite(self, runner, model: nn.Module, device: torch.device,
                      step: int, losses: dict, grad_norm: Optional[float]
                      ) -> None:
        self.bad_iters += 1
        bad_params, weights_bad = nonfinite_weights(model)
        loss = losses.get('loss', next(iter(losses.values()), math.nan))
        per_rank = gather_floats(loss, device)
        what = (f'iteration {step}: the loss is not finite (loss per rank '
                f'{_fmt(per_rank)}'
                + (f', gradient norm {grad_norm}' if grad_norm is not None
                   else '') + ')')
        if weights_bad:
            where = f' ({bad_params} on this rank)' if bad_params else ''
            raise TrainingDivergedError(
                f'Training stopped at {what}; the weights are not finite '
                f'either{where}, so no later step can recover and no '
                'checkpoint of them was written. Likely causes: '
                f'{LIKELY_CAUSES}. Resume from the last good checkpoint '
                '(its step is in the work dir\'s last_checkpoint) after '
                'fixing the cause.')
        message = (f'{what} for {self.bad_iters} consecutive iteration(s); '
                   'the weights are still finite')
        if self.action == 'stop' and self.bad_iters >= self.patience:
            raise TrainingDivergedError(
                f'Training stopped at {message} (patience={self.patience}). '
                f'Likely causes: {LIKELY_CAUSES}. Set TrainingHealthHook '
                "action='warn' or a larger patience to keep going.")
        runner.logger.warning(message)

    def _check_loss_scale(self, runner, step: int) -> None:
        if self.min_loss_scale is None:
            return
        scale = _logged(runner, 'train/loss_scale')
        if scale is None or scale >= self.min_loss_scale:
            return
        message = (
            f'the fp16 loss scale fell to {scale:g} at iteration {step}, '
            f'below min_loss_scale={self.min_loss_scale:g}: almost every '
            'step overflows and is skipped. Likely causes: '
            f'{LIKELY_CAUSES}; or train in bf16 where the GPU supports it')
        if self.action == 'stop':
            raise TrainingDivergedError(f'Training stopped: {message}')
        runner.logger.warning(message)


def _losses(outputs: Optional[dict]) -> dict:
    """The loss entries of a train step's outputs, as floats."""
    values = {}
    for key, value in (outputs or {}).items():
        if 'loss' not in key:
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().float().mean().item()
        values[key] = float(value)
    return values


def _logged(runner, key: str) -> Optional[float]:
    """The latest value of a message-hub scalar logged at this iteration."""
    scalars = runner.message_hub.log_scalars
    if key not in scalars:
        return None
    return float(scalars[key].current())


def _device_of(params: Iterable[torch.Tensor]) -> torch.device:
    """Where this rank's collectives run (NCCL needs CUDA tensors)."""
    first = next(iter(params), None)
    if first is not None and first.device.type == 'cuda':
        return first.device
    if dist.is_available() and dist.is_initialized() and \
            dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _fmt(values: List[float]) -> str:
    return '[' + ', '.join(f'{v:.4g}' for v in values) + ']'
