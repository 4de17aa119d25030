"""Which class centers of a shard take part in a Partial FC step."""
from __future__ import annotations

from typing import Tuple

import torch

from ..utils.rank_generator import RankGenerator


class CenterSampler:
    """Keep every positive of the global batch, fill up with random negatives.

    The budget is ``int(sample_rate * num_local)`` rows; if the batch holds
    more distinct local classes than that, only the positives are kept (so
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
        self._stream = RankGenerator(seed, name='CenterSampler')

    @property
    def seed(self) -> int:
        return self._stream.seed

    def generator(self, device: torch.device) -> torch.Generator:
        """The per-rank generator on ``device`` (created on first use; see
        :class:`~mmpfc.models.utils.rank_generator.RankGenerator`)."""
        return self._stream.get(device)

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
        return self._stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; applied when the generator is next
        created (on the device of the next labels)."""
        self._stream.load_state_dict(state)
