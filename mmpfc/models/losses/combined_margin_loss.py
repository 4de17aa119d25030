"""Angular margins of ArcFace, CosFace and SphereFace on cosine logits."""
from __future__ import annotations

import math
from typing import Optional

import torch

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import Real, arg_specs

from .base_margin import ANGLE, NON_NEGATIVE, BaseMargin


def psi(angle: torch.Tensor) -> torch.Tensor:
    """Monotonic extension of ``cos`` past pi: ``(-1)^k cos(u) - 2k``.

    ``k = floor(u / pi)``. Equal to ``cos(u)`` on [0, pi], continuous and
    strictly decreasing for every ``u >= 0`` (SphereFace's psi), so a margin
    that pushes ``theta + m`` beyond pi still lowers the target logit instead
    of raising it again.
    """
    k = torch.floor(angle.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * torch.cos(angle) - 2.0 * k


@MODELS.register_module()
@arg_specs(m1=Real(low=1.0), m2=ANGLE, m3=NON_NEGATIVE,
           interclass_filtering_threshold=Real(0.0, 1.0, high_open=True))
class CombinedMarginLoss(BaseMargin):
    """Target logit ``psi(m1 * theta + m2) - m3``, every logit times ``s``.

    ``m2`` is ArcFace's additive angular margin, ``m3`` CosFace's additive
    cosine margin and ``m1`` SphereFace's multiplicative angular margin; any
    combination is allowed. The margin is differentiated exactly through
    ``theta = arccos(cos)`` (no straight-through shortcut).

    Example::

        loss=dict(type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5, m3=0.0)

    Args:
        s: Scale applied to every logit.
        m1, m2, m3: Margins as above, ``m1 >= 1``, ``m2`` in [0, pi),
            ``m3 >= 0``; (1, 0, 0) is the plain normalized softmax.
        interclass_filtering_threshold: If > 0, non-target cosines above it
            are set to zero and get no gradient (filters noisy duplicates).
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.5,
                 m3: float = 0.0,
                 interclass_filtering_threshold: float = 0.0) -> None:
        super().__init__(s)
        self.m1, self.m2, self.m3 = m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def target_logit(self, cos: torch.Tensor,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Margin-adjusted cosine of the target class (unscaled)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3  # CosFace / plain: no arccos needed
        # arccos has an infinite slope at +-1: stay a rounding step inside.
        eps = torch.finfo(cos.dtype).eps
        theta = torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))
        return psi(self.m1 * theta + self.m2) - self.m3

    def extra_repr(self) -> str:
        return (f's={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, '
                'interclass_filtering_threshold='
                f'{self.interclass_filtering_threshold}')
