"""Compare a checkpoint with a model and its optimizer, before loading.

:func:`compare_state_dicts` says which keys or shapes differ (another
backbone, another configuration); :func:`check_optimizer_matches` refuses
optimizer state of another optimizer kind (SGD state resumed by AdamW).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .io import CheckpointError


class StateDictDiff(NamedTuple):
    """Keys of a model missing from a checkpoint, keys it does not have,
    and ``key: shapes`` that differ."""
    missing: List[str]
    unexpected: List[str]
    shapes: List[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self, limit: int = 8) -> str:
        """One line naming (at most ``limit`` of) the keys of each kind."""
        parts = []
        for label, keys in (('missing in the checkpoint', self.missing),
                            ('not in the model', self.unexpected),
                            ('with other shapes', self.shapes)):
            if keys:
                more = f', ... ({len(keys) - limit} more)' \
                    if len(keys) > limit else ''
                parts.append(f'{len(keys)} {label}: '
                             f'{", ".join(keys[:limit])}{more}')
        return '; '.join(parts)


def compare_state_dicts(model_state: dict,
                        checkpoint_state: dict) -> StateDictDiff:
    """How a checkpoint's state dict differs from the model's."""
    return StateDictDiff(
        missing=[k for k in model_state if k not in checkpoint_state],
        unexpected=[k for k in checkpoint_state if k not in model_state],
        shapes=[f'{k}: checkpoint {tuple(checkpoint_state[k].shape)} vs '
                f'model {tuple(v.shape)}' for k, v in model_state.items()
                if k in checkpoint_state and torch.is_tensor(v) and
                tuple(checkpoint_state[k].shape) != tuple(v.shape)])


# Group keys that do not tell optimizer kinds apart: added by schedulers, or
# by torch releases (a checkpoint of an older torch lacks them).
_NOT_KIND_KEYS = {'params', 'initial_lr', 'foreach', 'fused', 'capturable',
                  'differentiable', 'maximize', 'decoupled_weight_decay'}


def check_optimizer_matches(filename: str, saved: Optional[dict],
                            optim_wrapper) -> None:
    """Refuse to resume optimizer state saved by another kind of optimizer.

    torch's ``load_state_dict`` of, say, AdamW over SGD state ends in
    ``KeyError: 'step'``; SGD over Adam state silently drops the moments.
    The hyper-parameter names of the parameter groups tell the kinds apart.
    """
    optimizer = getattr(optim_wrapper, 'optimizer', None)
    if not isinstance(saved, dict) or 'param_groups' not in saved or \
            optimizer is None or not saved['param_groups']:
        return
    saved_keys = sorted(set(saved['param_groups'][0]) - _NOT_KIND_KEYS)
    current = sorted(set(optimizer.param_groups[0]) - _NOT_KIND_KEYS)
    if saved_keys == current:
        return
    raise CheckpointError(
        f'{filename} holds the state of an optimizer with parameter-group '
        f'settings {saved_keys}, but this run\'s '
        f'{type(optimizer).__name__} has {current}: another optimizer type '
        'cannot continue that state. Resume with the optimizer the run was '
        'trained with, or start a new run from its weights only '
        '(load_from=PATH with resume=False).')
