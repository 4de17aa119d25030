"""A per-rank random stream that follows its tensors' device and is saved.

The center sampler and the stochastic rounding of compact centers each
draw from their own stream: reproducible from a seed, independent of the
process's global RNG, and checkpointed per rank so that a resume continues
the same stream bit for bit.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Optional, Tuple

import torch
from mmengine.logging import print_log


def derived_seed(seed: int, state: torch.Tensor) -> int:
    """A seed in [0, 2**63) determined by ``seed`` and a generator state.

    Used where a saved state cannot be applied (another device type): the
    same checkpoint always gives the same stream, and not the stream that
    started from ``seed``.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update((int(seed) % 2**64).to_bytes(8, 'little'))
    digest.update(state.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), 'little') % 2**63


class RankGenerator:
    """A ``torch.Generator`` created on first use on the device asked for.

    A state restored by :meth:`load_state_dict`, or the state of the
    generator on the previous device when the model moved, continues on the
    new device: as is on the same device type; on another type (CPU Mersenne
    Twister vs CUDA Philox, whose states cannot be converted) the generator
    is reseeded from the seed and that state (:func:`derived_seed`), and a
    warning says so.

    Args:
        seed: Seed of the stream.
        name: What the stream is for, in warnings.
    """

    def __init__(self, seed: int, name: str = 'RankGenerator') -> None:
        self.seed = seed
        self.name = name
        self._generator: Optional[torch.Generator] = None
        self._pending_state: Optional[Tuple[str, torch.Tensor]] = None

    def get(self, device: torch.device) -> torch.Generator:
        """The generator on ``device``."""
        device = torch.device(device)
        if device.type == 'cuda' and device.index is None:
            device = torch.device('cuda', torch.cuda.current_device())
        if self._generator is not None and self._generator.device == device:
            return self._generator
        pending = self._pending_state
        if pending is None and self._generator is not None:
            pending = (self._generator.device.type,
                       self._generator.get_state())
        self._pending_state = None
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)
        if pending is not None:
            self._continue_from(pending, device)
        return self._generator

    def _continue_from(self, pending: Tuple[str, torch.Tensor],
                       device: torch.device) -> None:
        saved_type, state = pending
        if saved_type == device.type:
            self._generator.set_state(state)
            return
        seed = derived_seed(self.seed, state)
        self._generator.manual_seed(seed)
        print_log(
            f'{self.name}: a generator state from {saved_type} cannot '
            f'continue on {device.type} (the two random number generators '
            f'differ); reseeded with {seed}, derived from seed {self.seed} '
            'and that state, so the stream does not restart from the seed',
            logger='current', level=logging.WARNING)

    def state_dict(self) -> dict:
        """Seed, device type and generator state (CPU byte tensor)."""
        if self._generator is None:
            pending = self._pending_state
            return dict(seed=self.seed,
                        device=None if pending is None else pending[0],
                        generator=None if pending is None else pending[1])
        return dict(seed=self.seed, device=self._generator.device.type,
                    generator=self._generator.get_state())

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; applied when the generator is next
        created (on the device of the next call to :meth:`get`)."""
        self.seed = state['seed']
        self._generator = None
        self._pending_state = None if state['generator'] is None else (
            state['device'], state['generator'].cpu())
