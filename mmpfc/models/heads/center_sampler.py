"""Which class centers of a shard take part in a Partial FC step."""
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


class CenterSampler:
    """Keep every positive of the global batch, fill up with random negatives.

    The budget is ``int(sample_rate * num_local)`` rows; if the batch holds more
    distinct local classes than that, only the positives are kept (so
    ``sample_rate=0`` means positives only). Kept ids are sorted, so the
    sampled sub-matrix keeps class order.

    The random stream has its own ``torch.Generator`` so that sampling is
    reproducible and its state can be checkpointed per rank.

    Args:
        num_local: Rows of this rank's shard.
        sample_rate: Fraction of the shard sampled per step, in [0, 1].
        seed: Seed of this rank's generator.
    """

    def __init__(self, num_local: int, sample_rate: float, seed: int) -> None:
        self.num_local = num_local
        self.num_sample = int(sample_rate * num_local)
        self.seed = seed
        self._generator: Optional[torch.Generator] = None
        self._pending_state: Optional[Tuple[str, torch.Tensor]] = None

    def generator(self, device: torch.device) -> torch.Generator:
        """The per-rank generator on ``device`` (created on first use).

        A state restored by :meth:`load_state_dict`, or the state of the
        generator on the previous device when the model moved, continues on
        ``device``: as is on the same device type; on another type (CPU
        Mersenne Twister vs CUDA Philox, whose states cannot be converted)
        the generator is reseeded from the seed and that state, and a
        warning says so (:func:`derived_seed`).
        """
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
        """Apply a saved ``(device type, state)`` to the new generator."""
        saved_type, state = pending
        if saved_type == device.type:
            self._generator.set_state(state)
            return
        seed = derived_seed(self.seed, state)
        self._generator.manual_seed(seed)
        print_log(
            f'CenterSampler: a generator state from {saved_type} cannot '
            f'continue on {device.type} (the two random number generators '
            f'differ); reseeded with {seed}, derived from seed {self.seed} '
            'and that state, so the stream does not restart from the seed',
            logger='current', level=logging.WARNING)

    def sample(self, local_labels: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose rows and remap labels into them.

        When the budget exceeds the batch (the usual case: every positive
        fits), the rows are chosen with fixed-size operations only, so on
        CUDA nothing waits for the device; a budget at most the batch size
        needs the number of distinct positives first (one device read).

        Args:
            local_labels: (N,) label minus the shard start, -1 if not local.

        Returns:
            ``(index, labels)``: sorted row ids of the shard (S,), and the
            labels as positions in ``index`` (-1 kept for non-local rows).
        """
        is_local = local_labels >= 0
        if self.num_sample > local_labels.numel():
            index = self._fill_up(local_labels, is_local)
        else:
            index = self._positives_or_fill_up(local_labels, is_local)
        position = torch.searchsorted(index, local_labels.clamp_min(0))
        return index, torch.where(is_local, position,
                                  torch.full_like(position, -1))

    def _scores(self, device: torch.device) -> torch.Tensor:
        """``num_local`` uniform draws, and one spare slot at the end."""
        score = torch.empty(self.num_local + 1, device=device)
        torch.rand(self.num_local, device=device, out=score[:-1],
                   generator=self.generator(device))
        return score

    def _fill_up(self, local_labels: torch.Tensor,
                 is_local: torch.Tensor) -> torch.Tensor:
        """The positives and the best-scored negatives, ``num_sample`` rows.

        Positives score 2.0, above any uniform draw; non-local labels mark
        the spare slot, which ``topk`` never sees.
        """
        score = self._scores(local_labels.device)
        marks = torch.where(is_local, local_labels,
                            torch.full_like(local_labels, self.num_local))
        score.index_fill_(0, marks, 2.0)
        index = torch.topk(score[:-1], k=self.num_sample)[1]
        return index.sort()[0]

    def _positives_or_fill_up(self, local_labels: torch.Tensor,
                              is_local: torch.Tensor) -> torch.Tensor:
        """Only the positives when they fill the budget, else fill up."""
        positives = torch.unique(local_labels[is_local], sorted=True)
        if positives.numel() >= self.num_sample:
            return positives
        return self._fill_up(local_labels, is_local)

    def state_dict(self) -> dict:
        """Seed and generator state (CPU byte tensor), for checkpoints."""
        if self._generator is None:
            pending = self._pending_state
            return dict(seed=self.seed,
                        device=None if pending is None else pending[0],
                        generator=None if pending is None else pending[1])
        return dict(seed=self.seed, device=self._generator.device.type,
                    generator=self._generator.get_state())

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; applied when the generator is next
        created (on the device of the next labels, see :meth:`generator`)."""
        self.seed = state['seed']
        self._generator = None
        self._pending_state = None if state['generator'] is None else (
            state['device'], state['generator'].cpu())
