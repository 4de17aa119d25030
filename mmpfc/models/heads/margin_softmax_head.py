"""Replicated margin-softmax head: the data-parallel baseline."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmpfc.registry import MODELS
from .label_check import LabelRangeCheck
from .partial_fc_head import PartialFCHead, build_margin_loss
from .sampled_gradients import SampledGradients


@MODELS.register_module()
class MarginSoftmaxHead(PartialFCHead):
    """Every rank holds all C centers; DDP all-reduces their gradients.

    This is the "data parallel" column of the reference tables: simple, but
    its memory and all-reduce traffic grow with C on every rank. The loss is
    the margin softmax of this rank's own batch (DDP averages over ranks).

    Example::

        head=dict(type='MarginSoftmaxHead', num_classes=93431,
                  in_channels=512, loss=dict(type='CombinedMarginLoss'))
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 loss: dict = dict(type='CombinedMarginLoss', s=64.0, m1=1.0,
                                   m2=0.5, m3=0.0),
                 init_std: float = 0.01,
                 seed: Optional[int] = None,
                 init_cfg: Optional[dict] = None) -> None:
        # Skip PartialFCHead.__init__: nothing is sharded or sampled here.
        super(PartialFCHead, self).__init__(init_cfg=init_cfg)
        if in_channels <= 0:
            raise ValueError(f'in_channels must be > 0, got {in_channels}')
        self.rank, self.world_size = 0, 1  # replicated: one "shard" of all
        self.num_classes, self.in_channels = num_classes, in_channels
        self.sample_rate = 1.0
        self.class_start, self.num_local = 0, num_classes
        self.margin_loss = build_margin_loss(loss)
        base_seed = torch.initial_seed() if seed is None else seed
        init_gen = torch.Generator().manual_seed(base_seed % (2**63))
        self.weight = nn.Parameter(
            torch.empty(num_classes, in_channels).normal_(
                0.0, init_std, generator=init_gen))
        self._sampled = SampledGradients()
        self.check_batch_size = False  # each rank's own batch
        self._label_check = LabelRangeCheck(num_classes)

    def loss_by_labels(self, embeddings: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Margin softmax of the local batch over all classes."""
        labels = self._check_inputs(embeddings, labels)
        self._check_label_range(labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = torch.promote_types(
                torch.promote_types(embeddings.dtype, self.weight.dtype),
                torch.float32)
            cos = F.linear(F.normalize(embeddings.to(dtype), dim=1),
                           F.normalize(self.weight.to(dtype), dim=1))
            logits = self.margin_loss(cos.clamp(-1.0, 1.0), labels)
            return F.cross_entropy(logits, labels)
