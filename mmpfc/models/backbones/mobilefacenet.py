"""MobileFaceNet, the small face backbone of insightface ``arcface_torch``.

Parameter names follow insightface (every block keeps its parts in a
``layers`` sequence) so its released ``backbone.pth`` files load with
``strict=True``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import INIT_CFG, Bool, Int, Seq, arg_specs

from .iresnet import autocast_if, run_full_precision


class _Layers(nn.Module):
    """Runs ``self.layers`` in order; the nesting gives insightface's keys."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1,
            stride: int = 1, groups: int = 1, act: bool = True) -> _Layers:
    """Conv (no bias) + BN (+ PReLU): insightface's ConvBlock / LinearBlock.

    3x3 convs are padded to keep the size; 1x1 and the 7x7 GDC are not.
    """
    padding = 1 if kernel == 3 else 0
    parts = [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                  padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels)
    ]
    if act:
        parts.append(nn.PReLU(out_channels))
    return _Layers(*parts)


class DepthWise(_Layers):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise, linear 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int,
                 stride: int = 1, residual: bool = False) -> None:
        super().__init__(
            conv_bn(in_channels, mid_channels),
            conv_bn(mid_channels, mid_channels, 3, stride, mid_channels),
            conv_bn(mid_channels, out_channels, act=False))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def residual_stage(channels: int, blocks: int, mid_channels: int) -> _Layers:
    """``blocks`` stride-1 bottlenecks with identity shortcuts."""
    return _Layers(*[
        DepthWise(channels, channels, mid_channels, residual=True)
        for _ in range(blocks)
    ])


@MODELS.register_module()
@arg_specs(embedding_size=Int(low=1), blocks=Seq(Int(low=1), length=4),
           scale=Int(low=1), fp16=Bool(), init_cfg=INIT_CFG)
class MobileFaceNet(BaseModule):
    """MobileFaceNet (~0.45 GFLOPs at ``scale=2``) with a GDC head.

    The global depthwise conv (GDC) head weighs each of the 7x7 positions
    separately instead of average pooling, which matters for aligned faces.
    ``blocks=(2, 8, 12, 4), scale=4`` gives insightface's ``mbf_large``.

    Example::

        backbone=dict(type='mmpfc.MobileFaceNet', embedding_size=512)

    Args:
        embedding_size: Output dimension D.
        blocks: Bottlenecks in the four stages; a first entry of 1 means a
            single depthwise conv instead of a residual stage.
        scale: Width multiplier of the stages (64 * scale, 128 * scale).
        fp16: Run the body under autocast (insightface's ``fp16``
            switch). The 1x1 conv and the GDC head (the embedding) always run
            in the weights' precision, outside any autocast, also under the
            optim wrapper's AMP.
        init_cfg: MMEngine init config, e.g. ``Pretrained``.

    ``forward`` returns a one-tuple ``(embedding,)`` of shape (N, D).
    """

    def __init__(self,
                 embedding_size: int = 512,
                 blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2,
                 fp16: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.embedding_size = embedding_size
        self.fp16 = fp16
        c1, c2 = 64 * scale, 128 * scale
        # The bottleneck widths (128/256/512) do not scale, as in insightface.
        first = (conv_bn(c1, c1, 3, groups=64) if blocks[0] == 1 else
                 residual_stage(c1, blocks[0], 128))
        self.layers = nn.Sequential(
            conv_bn(3, c1, 3, stride=2),  # 112 -> 56
            first,
            DepthWise(c1, c1, 128, stride=2),  # -> 28
            residual_stage(c1, blocks[1], 128),
            DepthWise(c1, c2, 256, stride=2),  # -> 14
            residual_stage(c2, blocks[2], 256),
            DepthWise(c2, c2, 512, stride=2),  # -> 7
            residual_stage(c2, blocks[3], 256),
        )
        self.conv_sep = conv_bn(c2, 512)
        self.features = _Layers(
            conv_bn(512, 512, 7, groups=512, act=False),  # GDC
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """insightface's initialization: Kaiming fan-out, unit BNs."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode='fan_out',
                                        nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        with autocast_if(self.fp16, x.device.type):
            x = self.layers(x)
        dtype = self.features.layers[2].weight.dtype
        return (run_full_precision(self.embedding, x, dtype), )

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding layers: 1x1 conv, GDC, linear and BatchNorm1d."""
        return self.features(self.conv_sep(x))
