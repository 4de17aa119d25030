"""The random state of a training process, saved with its shard.

MMEngine's checkpoints hold the seed only, so after a resume dropout, drop
path and main-process augmentations draw other numbers than the run that
went straight through. Each rank saves its own state here; a resume on the
same ranks puts it back before the first iteration.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch


def process_rng_state() -> dict:
    """torch (CPU and every initialized CUDA device), numpy, random."""
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                 python=random.getstate(), cuda=None)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_process_rng_state(state: Optional[dict]) -> None:
    """Restore what :func:`process_rng_state` returned (None: nothing)."""
    if not state:
        return
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    cuda = state.get('cuda')
    if cuda is not None and torch.cuda.is_available() and \
            len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
