"""The face-recognition model: backbone (+ neck) producing an embedding, and a
margin-softmax head that turns it into a loss or a prediction."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModel

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import INIT_CFG, Instance, Opt, arg_specs

# insightface's input convention: RGB, (x / 255 - 0.5) / 0.5, i.e. [-1, 1];
# ClsDataPreprocessor's maths with one asynchronous copy per batch.
DEFAULT_PREPROCESSOR = dict(
    type='mmpfc.FaceDataPreprocessor',
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    to_rgb=False)

MODES = ('tensor', 'loss', 'predict')


def _build(cfg: Union[dict, nn.Module]) -> nn.Module:
    return cfg if isinstance(cfg, nn.Module) else MODELS.build(cfg)


@MODELS.register_module()
@arg_specs(backbone=Instance(dict, nn.Module),
           head=Opt(Instance(dict, nn.Module)),
           neck=Opt(Instance(dict, nn.Module)),
           data_preprocessor=Opt(Instance(dict, nn.Module)),
           init_cfg=INIT_CFG)
class FaceRecognizer(BaseModel):
    """Embedding model trained with a (Partial FC) margin-softmax head.

    Unlike mmpretrain's ``ImageClassifier``, ``mode='tensor'`` returns the
    backbone (or neck) features, not the head output: the embedding is the
    product of a face model, and the head's class logits are sharded over
    ranks and meaningless at test time.

    The default preprocessor scales uint8 pixels to [-1, 1] and keeps the
    channel order: it expects RGB images, insightface's convention and what
    its released weights were trained on. Set ``to_rgb=True`` for a pipeline
    that yields BGR (e.g. ``LoadImageFromFile`` with its default
    ``channel_order``). A ``data_preprocessor`` dict without ``type``
    overrides fields of the default.

    Example::

        model = dict(
            type='mmpfc.FaceRecognizer',
            backbone=dict(type='mmpfc.IResNet', depth=50),
            head=dict(type='mmpfc.PartialFCHead', num_classes=93431,
                      in_channels=512, sample_rate=0.1))

    Args:
        backbone: Config or module; ``forward`` returns a tuple of features.
        head: Config or module with ``loss(feats, data_samples) -> dict``
            and ``predict(feats, data_samples) -> list[DataSample]``.
            Required for ``mode='loss'`` and ``mode='predict'``.
        neck: Optional config or module applied to the backbone tuple.
        data_preprocessor: Config or module; see above.
        init_cfg: MMEngine init config.
    """

    def __init__(self,
                 backbone: Union[dict, nn.Module],
                 head: Optional[Union[dict, nn.Module]] = None,
                 neck: Optional[Union[dict, nn.Module]] = None,
                 data_preprocessor: Optional[Union[dict, nn.Module]] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if data_preprocessor is None:
            data_preprocessor = dict(DEFAULT_PREPROCESSOR)
        elif isinstance(data_preprocessor, dict) and \
                'type' not in data_preprocessor:
            data_preprocessor = {**DEFAULT_PREPROCESSOR, **data_preprocessor}
        if isinstance(data_preprocessor, dict):
            data_preprocessor = MODELS.build(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor,
                         init_cfg=init_cfg)
        self.backbone = _build(backbone)
        self.neck = None if neck is None else _build(neck)
        self.head = None if head is None else _build(head)

    @property
    def with_neck(self) -> bool:
        return self.neck is not None

    @property
    def with_head(self) -> bool:
        return self.head is not None

    def extract_feat(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Backbone (and neck) features, a tuple whose last item is the
        embedding."""
        feats = self.backbone(inputs)
        if self.with_neck:
            feats = self.neck(feats)
        return feats

    def forward(self,
                inputs: torch.Tensor,
                data_samples: Optional[List] = None,
                mode: str = 'tensor'
                ) -> Union[Tuple[torch.Tensor, ...], Dict[str, torch.Tensor],
                           List]:
        """``tensor``: features; ``loss``: dict of losses (needs labelled
        ``data_samples``); ``predict``: data samples from ``head.predict``."""
        if mode not in MODES:
            raise ValueError(f'Invalid mode {mode!r} for FaceRecognizer; '
                             f'expected one of {MODES}')
        feats = self.extract_feat(inputs)
        if mode == 'tensor':
            return feats
        if not self.with_head:
            raise RuntimeError(f'FaceRecognizer has no head, so mode='
                               f'{mode!r} is unavailable; configure `head` '
                               "or use mode='tensor'")
        if mode == 'loss':
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples with labels")
            return self.head.loss(feats, data_samples)
        return self.head.predict(feats, data_samples)
