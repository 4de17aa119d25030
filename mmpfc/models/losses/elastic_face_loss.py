"""ElasticFace: ArcFace / CosFace with a margin drawn anew for every sample."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import Bool, Int, OneOf, Opt, arg_specs

from ..utils.distributed import get_rank_and_world_size
from .base_margin import (ANGLE, NON_NEGATIVE, BaseMargin, MarginBatch,
                          safe_acos)
from .counter_rng import counter_normal

KINDS = ('arc', 'cos')


@MODELS.register_module()
@arg_specs(m=ANGLE, std=NON_NEGATIVE, kind=OneOf(*KINDS), plus=Bool(),
           seed=Opt(Int()))
class ElasticFaceLoss(BaseMargin):
    """Target ``cos(theta + m_i)`` (``kind='arc'``) or ``cos - m_i``
    (``kind='cos'``) with ``m_i ~ N(m, std)`` drawn per row and step.

    The draws are the same on every rank: they are a function of the
    buffers ``seed`` and ``draws`` (:mod:`.counter_rng`), which are
    replicated, saved with the model and advanced once per training step;
    a resumed run continues the same sequence on any device. ``plus=True``
    (ElasticFace+) hands the sorted margins out by target cosine: the row
    with the highest target cosine gets the smallest margin, the hardest row
    the largest. In eval mode every row gets ``m`` and nothing advances.

    Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face
    Recognition", CVPR Workshops 2022.

    Example::

        loss=dict(type='ElasticFaceLoss', s=64.0, m=0.5, std=0.05,
                  kind='arc')

    Args:
        s: Scale applied to every logit.
        m: Mean margin, in [0, pi).
        std: Standard deviation of the margin, >= 0.
        kind: ``'arc'`` (angular margin) or ``'cos'`` (cosine margin).
        plus: Sort the margins against the target cosines (ElasticFace+).
        seed: Seed of the draws; None: ``torch.initial_seed()``. Rank 0's
            seed is broadcast at the first draw, so ranks seeded
            differently still agree.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, std: float = 0.0125,
                 kind: str = 'arc', plus: bool = False,
                 seed: Optional[int] = None) -> None:
        super().__init__(s)
        self.m, self.std, self.kind, self.plus = m, std, kind, plus
        seed = torch.initial_seed() if seed is None else seed
        self.register_buffer('seed', torch.tensor(seed % 2**63))
        self.register_buffer('draws', torch.zeros((), dtype=torch.int64))
        self._row_margins: Optional[torch.Tensor] = None
        self._seed_synced = False

    def prepare(self, batch: MarginBatch) -> None:
        """Draw this step's margins (training) or use ``m`` (eval)."""
        self._row_margins = None
        if not self.training:
            return
        if not self._seed_synced:  # once: one collective, no device read
            if get_rank_and_world_size()[1] > 1:
                dist.broadcast(self.seed, src=0)
            self._seed_synced = True
        normal = counter_normal(self.seed, self.draws, batch.row_ids())
        margins = (self.m + self.std * normal).to(batch.cos_t.dtype)
        if self.plus:
            margins = self._sorted_by_cosine(margins, batch)
        self.draws.add_(1)
        self._row_margins = margins

    @staticmethod
    def _sorted_by_cosine(margins: torch.Tensor,
                          batch: MarginBatch) -> torch.Tensor:
        """The k-th highest target cosine gets the k-th smallest margin
        (among the rows of ``batch``: this rank's own under DDP)."""
        cos_t = batch.cos_t
        if batch.valid is not None:  # rows without a target go last
            cos_t = cos_t.masked_fill(~batch.valid, -float('inf'))
        order = torch.sort(cos_t, descending=True, stable=True)[1]
        ascending = torch.sort(margins, stable=True)[0]
        return torch.empty_like(margins).index_copy_(0, order, ascending)

    def row_margins(self, cos_t: torch.Tensor) -> torch.Tensor:
        """This step's margin of each row (``m`` before :meth:`prepare`, in
        eval mode, or for rows of another size)."""
        margins = self._row_margins
        if margins is None or margins.shape != cos_t.shape:
            return torch.full_like(cos_t, self.m)
        return margins.to(cos_t.dtype)

    def target_logit(self, cos_t: torch.Tensor,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        margins = self.row_margins(cos_t)
        if self.kind == 'arc':
            return torch.cos(safe_acos(cos_t) + margins)
        return cos_t - margins

    def extra_repr(self) -> str:
        return (f's={self.s}, m={self.m}, std={self.std}, kind={self.kind!r}'
                f', plus={self.plus}')
