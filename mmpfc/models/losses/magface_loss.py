"""MagFace: a margin that grows with the feature magnitude, plus a regularizer
that pulls easy samples to large magnitudes."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import Arg, Bool, Real, arg_specs

from .base_margin import ANGLE, NON_NEGATIVE, BaseMargin, safe_acos


@MODELS.register_module()
@arg_specs(l_a=Real(low=0.0, low_open=True),
           u_a=Real(low=Arg('l_a'), low_open=True), l_m=ANGLE,
           u_m=Real(Arg('l_m'), math.pi, high_open=True),
           lambda_g=NON_NEGATIVE, easy_margin=Bool())
class MagFaceLoss(BaseMargin):
    """Target ``cos(theta + m(a))`` with ``a = clamp(|x|, l_a, u_a)``.

    ``m(a) = (u_m - l_m) (a - l_a) / (u_a - l_a) + l_m`` rises linearly with
    the raw feature magnitude ``a``; the regularizer
    ``lambda_g * mean(1 / a + a / u_a^2)`` is added to the loss. Both are
    differentiated in ``a`` (zero outside [l_a, u_a]), so the gradient of the
    features has a radial part. ``easy_margin=True`` keeps ``cos`` where
    ``cos <= 0`` (the authors' default); ``False`` uses ``cos - m(a) sin(pi -
    m(a))`` where ``cos <= cos(pi - m(a))``.

    Meng et al., "MagFace: A Universal Representation for Face Recognition
    and Quality Assessment", CVPR 2021.

    Example::

        loss=dict(type='MagFaceLoss', s=64.0, l_a=10, u_a=110, l_m=0.45,
                  u_m=0.8, lambda_g=35)

    Args:
        s: Scale applied to every logit.
        l_a, u_a: Magnitude range, ``0 < l_a < u_a``.
        l_m, u_m: Margins at ``l_a`` and ``u_a``, ``0 <= l_m <= u_m < pi``.
        lambda_g: Weight of the magnitude regularizer, >= 0.
        easy_margin: As above.
    """

    uses_norms = True

    def __init__(self, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8,
                 lambda_g: float = 35.0, easy_margin: bool = True) -> None:
        super().__init__(s)
        self.l_a, self.u_a, self.l_m, self.u_m = l_a, u_a, l_m, u_m
        self.lambda_g, self.easy_margin = lambda_g, easy_margin
        if lambda_g < self.min_lambda_g():
            warnings.warn(
                f'MagFaceLoss: lambda_g={lambda_g} is below '
                f'{self.min_lambda_g():.4g}, the paper\'s sufficient '
                'condition for a unique optimal magnitude in [l_a, u_a] '
                '(magnitudes may then not order samples by quality)',
                stacklevel=2)

    def min_lambda_g(self) -> float:
        """The paper's lower bound on ``lambda_g`` for a unique optimal
        magnitude: ``s k u_a^2 l_a^2 / (u_a^2 - l_a^2)``, ``k`` the slope
        of ``m(a)``."""
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return (self.s * slope * self.u_a**2 * self.l_a**2
                / (self.u_a**2 - self.l_a**2))

    def magnitude(self, norms: torch.Tensor) -> torch.Tensor:
        """``a``: the norms clamped to [l_a, u_a] (with gradient)."""
        return norms.clamp(self.l_a, self.u_a)

    def margin_of(self, a: torch.Tensor) -> torch.Tensor:
        slope = (self.u_m - self.l_m) / (self.u_a - self.l_a)
        return slope * (a - self.l_a) + self.l_m

    def target_logit(self, cos_t: torch.Tensor,
                     norms: Optional[torch.Tensor] = None) -> torch.Tensor:
        if norms is None:
            raise ValueError('MagFaceLoss needs the raw embedding norms')
        margin = self.margin_of(self.magnitude(norms.to(cos_t.dtype)))
        with_margin = torch.cos(safe_acos(cos_t) + margin)
        if self.easy_margin:
            return torch.where(cos_t > 0, with_margin, cos_t)
        return torch.where(cos_t > torch.cos(math.pi - margin), with_margin,
                           cos_t - margin * torch.sin(math.pi - margin))

    def extra_loss(self, norms: Optional[torch.Tensor]
                   ) -> Optional[torch.Tensor]:
        a = self.magnitude(norms)
        return self.lambda_g * (1.0 / a + a / self.u_a**2)

    def extra_repr(self) -> str:
        return (f's={self.s}, l_a={self.l_a}, u_a={self.u_a}, '
                f'l_m={self.l_m}, u_m={self.u_m}, lambda_g={self.lambda_g}, '
                f'easy_margin={self.easy_margin}')
