"""IResNet, the face-recognition ResNet of ArcFace and Partial FC.

Module and parameter names follow insightface ``arcface_torch`` so that its
released ``backbone.pth`` files load with ``strict=True``; do not rename
attributes or reorder the ``layerN`` sequences.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Dict, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import INIT_CFG, Bool, Int, Parsed, Real, arg_specs

# Blocks per stage; the stage widths are always 64, 128, 256, 512.
IRESNET_ARCHS: Dict[int, Tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5  # insightface's value; momentum stays at PyTorch's 0.1


def check_depth(depth: int) -> int:
    """``depth`` if IResNet has that depth; ValueError otherwise."""
    if isinstance(depth, bool) or not isinstance(depth, int) or \
            depth not in IRESNET_ARCHS:
        raise ValueError(f'depth {depth!r} is not supported; choose one of '
                         f'{sorted(IRESNET_ARCHS)}')
    return depth


def autocast_if(enabled: bool, device_type: str) -> ContextManager:
    """Autocast only when asked.

    ``torch.autocast(enabled=False)`` would switch off an outer AMP region
    (e.g. MMEngine's ``AmpOptimWrapper``), so a backbone built with
    ``fp16=False`` must not open any autocast context at all.
    """
    if enabled:
        return torch.autocast(device_type)
    return contextlib.nullcontext()


def no_autocast(device_type: str) -> ContextManager:
    """Switch autocast off for ``device_type`` (where torch has autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def run_full_precision(fn: Callable[[torch.Tensor], torch.Tensor],
                       x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fn(x)`` outside autocast, with ``x`` cast to ``dtype``.

    The embedding layers of a face backbone run here, ``dtype`` being their
    weights': under an outer AMP region (the optim wrapper's autocast) they
    would otherwise compute the embedding in fp16/bf16, and the head would
    all-gather it, and reduce-scatter its gradient, in that precision.
    insightface keeps them in fp32 as well.
    """
    with no_autocast(x.device.type):
        return fn(x.to(dtype))


def _conv3x3(in_channels: int, out_channels: int,
             stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride,
                     padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style block: BN-conv-BN-PReLU-conv(stride)-BN + shortcut.

    Unlike torchvision's BasicBlock the stride sits on the second conv and
    there is no activation after the sum (the "improved" residual unit of
    ArcFace).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.prelu(self.bn2(out)))
        out = self.bn3(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


@MODELS.register_module()
@arg_specs(depth=Parsed(check_depth, wrong=[42, '50', 50.0, [50]]),
           embedding_size=Int(low=1), dropout=Real(0.0, 1.0, high_open=True),
           fp16=Bool(), zero_init_residual=Bool(), init_cfg=INIT_CFG)
class IResNet(BaseModule):
    """IResNet-18/34/50/100/200 for 112x112 faces, giving one embedding.

    Every stage halves the resolution (112 -> 7); the 512x7x7 map is
    flattened into a fully connected layer (keeps spatial layout, which
    matters for aligned faces) and a BatchNorm1d whose scale is frozen at 1,
    so only its shift and running statistics shape the embedding.

    Example::

        backbone=dict(type='mmpfc.IResNet', depth=50, embedding_size=512)
        # a released insightface model:
        backbone=dict(type='mmpfc.IResNet', depth=100, init_cfg=dict(
            type='Pretrained', checkpoint='ms1mv3_arcface_r100/backbone.pth'))

    Args:
        depth: One of 18, 34, 50, 100, 200.
        embedding_size: Output dimension D.
        dropout: Dropout probability before the fc layer.
        fp16: Run the convolutional body under autocast (insightface's
            ``fp16`` switch). Leave it off when the optim wrapper already
            autocasts the whole model. The fc layer and the final BN (the
            embedding) always run in the weights' precision, outside any
            autocast (:func:`run_full_precision`).
        zero_init_residual: Zero the scale of each branch's last BN (bn3)
            so every block starts as the identity (insightface zeroes bn2,
            which silences the branch too but is the less common choice).
        init_cfg: MMEngine init config, e.g. ``Pretrained``.

    ``forward`` returns a one-tuple ``(embedding,)`` of shape (N, D).
    """

    def __init__(self,
                 depth: int = 50,
                 embedding_size: int = 512,
                 dropout: float = 0.0,
                 fp16: bool = False,
                 zero_init_residual: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.depth = depth
        self.embedding_size = embedding_size
        self.fp16 = fp16

        self.conv1 = _conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        for i, (width, blocks) in enumerate(
                zip(STAGE_WIDTHS, IRESNET_ARCHS[depth]), start=1):
            self.add_module(f'layer{i}',
                            self._make_stage(in_channels, width, blocks))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        # 112x112 input -> 7x7 after four stride-2 stages.
        self.fc = nn.Linear(in_channels * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._reset_parameters(zero_init_residual)

    @staticmethod
    def _make_stage(in_channels: int, channels: int,
                    blocks: int) -> nn.Sequential:
        """A stage whose first block strides 2 through a 1x1-conv shortcut."""
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, stride=2,
                      bias=False),
            nn.BatchNorm2d(channels, eps=BN_EPS))
        layers = [IBasicBlock(in_channels, channels, 2, downsample)]
        layers += [IBasicBlock(channels, channels) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _reset_parameters(self, zero_init_residual: bool) -> None:
        """insightface's initialization: N(0, 0.1) convs, unit BNs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # after the loop, which resets every BN
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        with autocast_if(self.fp16, x.device.type):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return (run_full_precision(self.embedding, x,
                                   self.fc.weight.dtype), )

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding layers: fc, then the BatchNorm1d ``features``."""
        return self.features(self.fc(x))
