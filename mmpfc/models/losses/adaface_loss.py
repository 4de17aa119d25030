"""AdaFace: a margin that adapts to image quality through the feature norm."""
from __future__ import annotations

import math
from typing import Optional

import torch

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import arg_specs

from .base_margin import ANGLE, NON_NEGATIVE, UNIT, BaseMargin, MarginBatch

EPS = 1e-3  # the authors' stability bound on cosines, angles and the std


@MODELS.register_module()
@arg_specs(m=ANGLE, h=NON_NEGATIVE, t_alpha=UNIT)
class AdaFaceLoss(BaseMargin):
    """Target ``cos(clip(theta - m g, eps, pi - eps)) - (m + m g)``.

    ``g = clip(h (|x| - mean) / (std + eps), -1, 1)`` measures how large the
    raw feature norm ``|x|`` (a proxy of image quality) is against running
    statistics of the norms. ``g = -1`` (low quality) is ArcFace's
    ``cos(theta + m)``, ``g = 0`` CosFace's ``cos(theta) - m``, and ``g = 1``
    (high quality) ``cos(theta - m) - 2m``, which weighs hard samples of
    good images more. The norms are clipped to [0.001, 100] and detached
    (no gradient through the margin); ``mean`` and ``std`` (unbiased) are
    running averages over the global batch (start 20 and 100), updated
    before use.
    All cosines are clamped to ``[-1 + eps, 1 - eps]`` (``cos_bound``).

    Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition",
    CVPR 2022.

    Example::

        loss=dict(type='AdaFaceLoss', s=64.0, m=0.4, h=0.333)

    Args:
        s: Scale applied to every logit.
        m: Margin, in [0, pi).
        h: Concentration of the norm scaler, >= 0 (0: CosFace).
        t_alpha: Momentum of the norm statistics, in [0, 1].
    """

    uses_norms = True
    cos_bound = 1.0 - EPS

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333,
                 t_alpha: float = 0.01) -> None:
        super().__init__(s)
        self.m, self.h, self.t_alpha = m, h, t_alpha
        self.register_buffer('batch_mean', torch.full((), 20.0))
        self.register_buffer('batch_std', torch.full((), 100.0))

    @staticmethod
    def safe_norms(norms: torch.Tensor) -> torch.Tensor:
        return norms.detach().clip(0.001, 100.0)

    def prepare(self, batch: MarginBatch) -> None:
        if not self.training:
            return
        mean, std = batch.mean_std(self.safe_norms(batch.norms))
        alpha = self.t_alpha
        self.batch_mean.copy_(alpha * mean.to(self.batch_mean.dtype)
                              + (1.0 - alpha) * self.batch_mean)
        self.batch_std.copy_(alpha * std.to(self.batch_std.dtype)
                             + (1.0 - alpha) * self.batch_std)

    def norm_scaler(self, norms: torch.Tensor) -> torch.Tensor:
        """``g`` in [-1, 1] per row (no gradient)."""
        mean = self.batch_mean.to(norms.dtype)
        std = self.batch_std.to(norms.dtype)
        scaled = (self.safe_norms(norms) - mean) / (std + EPS) * self.h
        return scaled.clip(-1.0, 1.0)

    def target_logit(self, cos_t: torch.Tensor,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        if norms is None:
            raise ValueError('AdaFaceLoss needs the raw embedding norms')
        g = self.norm_scaler(norms).to(cos_t.dtype)
        theta = torch.acos(cos_t.clamp(-1.0 + EPS, 1.0 - EPS))
        angle = (theta - self.m * g).clip(EPS, math.pi - EPS)
        return torch.cos(angle) - (self.m + self.m * g)

    def extra_repr(self) -> str:
        return (f's={self.s}, m={self.m}, h={self.h}, '
                f't_alpha={self.t_alpha}')
