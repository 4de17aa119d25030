"""CurricularFace: an ArcFace target whose hard negatives weigh more as
training progresses."""
from __future__ import annotations

import math
from typing import Optional

import torch

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import arg_specs

from .base_margin import ANGLE, UNIT, BaseMargin, MarginBatch, safe_acos


@MODELS.register_module()
@arg_specs(m=ANGLE, t_alpha=UNIT)
class CurricularFaceLoss(BaseMargin):
    """Target ``cos(theta + m)``; hard non-targets ``cos * (t + cos)``.

    A non-target cosine is *hard* when it exceeds its row's ``cos(theta +
    m)``. ``t`` is a running mean of the target cosines (starts at 0, so
    hard negatives are first down-weighted, then up-weighted as the model
    learns): ``t <- t_alpha * mean(cos_t) + (1 - t_alpha) * t``, over the
    global batch, before use. Past ``theta = pi - m`` the target logit is
    ``cos - m * sin(pi - m)`` (it keeps falling). The non-target gradient
    goes through ``cos`` only, not through ``t`` or the threshold.

    Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for
    Deep Face Recognition", CVPR 2020.

    Example::

        loss=dict(type='CurricularFaceLoss', s=64.0, m=0.5)

    Args:
        s: Scale applied to every logit.
        m: Additive angular margin, in [0, pi).
        t_alpha: Momentum of the running mean ``t``, in [0, 1].
    """

    modifies_non_target = True

    def __init__(self, s: float = 64.0, m: float = 0.5,
                 t_alpha: float = 0.01) -> None:
        super().__init__(s)
        self.m, self.t_alpha = m, t_alpha
        self.threshold = math.cos(math.pi - m)
        self.fallback = math.sin(math.pi - m) * m
        self.register_buffer('t', torch.zeros(()))

    def prepare(self, batch: MarginBatch) -> None:
        if self.training:
            mean = batch.mean(batch.cos_t).to(self.t.dtype)
            self.t.copy_(self.t_alpha * mean + (1.0 - self.t_alpha) * self.t)

    def cos_theta_m(self, cos_t: torch.Tensor) -> torch.Tensor:
        """``cos(theta + m)``: the target with margin, and the hardness
        threshold of the row's non-targets."""
        return torch.cos(safe_acos(cos_t) + self.m)

    def target_logit(self, cos_t: torch.Tensor,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.where(cos_t > self.threshold, self.cos_theta_m(cos_t),
                           cos_t - self.fallback)

    def non_target_logit(self, cos: torch.Tensor,
                         cos_t: torch.Tensor) -> torch.Tensor:
        t = self.t.to(cos.dtype)
        hard = cos > self.cos_theta_m(cos_t)
        return torch.where(hard, cos * (t + cos), cos)

    def non_target_slope(self, cos: torch.Tensor,
                         cos_t: torch.Tensor) -> torch.Tensor:
        t = self.t.to(cos.dtype)
        hard = cos > self.cos_theta_m(cos_t)
        return torch.where(hard, t + 2.0 * cos, torch.ones_like(cos))

    def apply_non_target_(self, cos: torch.Tensor, cos_t: torch.Tensor,
                          slope_out: torch.Tensor) -> None:
        # the two methods above with one hardness test and in place: the
        # elementwise passes over the (S, N) block are most of this
        # margin's cost beyond ArcFace's
        # (hard as 0/1 in the cosines' dtype: cheaper than where on a mask)
        t = self.t.to(cos.dtype)
        hard = torch.sub(cos, self.cos_theta_m(cos_t)).gt_(0.0)
        plus = cos + t
        # slope 1 + hard (t + 2 cos - 1); logit cos + hard cos (t + cos - 1)
        torch.add(plus, cos, out=slope_out).sub_(1.0).mul_(hard).add_(1.0)
        cos.addcmul_(hard, plus.sub_(1.0).mul_(cos))

    def extra_repr(self) -> str:
        return f's={self.s}, m={self.m}, t_alpha={self.t_alpha}'
