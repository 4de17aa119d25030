"""Which class centers of a shard take part in a Partial FC step."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


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

        A state restored by :meth:`load_state_dict` is applied when the
        generator is created on the same kind of device it was saved from.
        """
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            pending = self._pending_state
            if pending is not None and pending[0] == torch.device(device).type:
                self._generator.set_state(pending[1])
            self._pending_state = None
        return self._generator

    def sample(self, local_labels: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Choose rows and remap labels into them.

        Args:
            local_labels: (N,) label minus the shard start, -1 if not local.

        Returns:
            ``(index, labels)``: sorted row ids of the shard (S,), and the
            labels as positions in ``index`` (-1 kept for non-local rows).
        """
        device = local_labels.device
        is_local = local_labels >= 0
        positives = torch.unique(local_labels[is_local], sorted=True)
        if positives.numel() >= self.num_sample:
            index = positives
        else:
            score = torch.rand(self.num_local, device=device,
                               generator=self.generator(device))
            score[positives] = 2.0  # above any uniform draw: always kept
            index = torch.topk(score, k=self.num_sample)[1]
            index = index.sort()[0]
        remapped = torch.full_like(local_labels, -1)
        remapped[is_local] = torch.searchsorted(index, local_labels[is_local])
        return index, remapped

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
        self.seed = state['seed']
        self._generator = None
        self._pending_state = None if state['generator'] is None else (
            state['device'], state['generator'].cpu())
