"""Replicated margin-softmax head: the data-parallel baseline."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import Parsed, arg_specs

from ..losses import BaseMargin
from ..utils.low_precision import parse_center_dtype
from .base_margin_head import BaseMarginHead


@MODELS.register_module()
@arg_specs(center_dtype=Parsed(parse_center_dtype, wrong=['int8', 1]))
class MarginSoftmaxHead(BaseMarginHead):
    """Every rank holds all C centers; DDP all-reduces their gradients.

    This is the "data parallel" column of the reference tables: simple, but
    its memory and all-reduce traffic grow with C on every rank. The loss is
    the margin softmax of this rank's own batch (DDP averages over ranks).
    Nothing is sharded or sampled: it is one "shard" of all classes
    (``class_start=0``, ``num_local=num_classes``, ``sample_rate=1.0``).
    A :class:`~mmpfc.models.losses.BaseMargin` gets the raw embedding norms
    when it uses them, adds its extra loss, and all-reduces the statistics
    of its running buffers over the ranks (each rank sees its own batch).

    ``center_dtype='bfloat16'`` / ``'float16'`` stores the centers in 16
    bits (logits in fp32, as :class:`PartialFCHead`); they are updated by
    the optimizer itself, in their dtype with round-to-nearest (no
    stochastic rounding: a replicated head is the small-scale baseline).

    Example::

        head=dict(type='MarginSoftmaxHead', num_classes=93431,
                  in_channels=512, loss=dict(type='CombinedMarginLoss'))
    """

    sample_rate = 1.0
    class_start = 0

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 loss: dict = dict(type='CombinedMarginLoss', s=64.0, m1=1.0,
                                   m2=0.5, m3=0.0),
                 init_std: float = 0.01,
                 seed: Optional[int] = None,
                 center_dtype: Union[str, torch.dtype] = 'float32',
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(num_classes, in_channels, loss, init_cfg=init_cfg)
        self.num_local = num_classes
        base_seed = torch.initial_seed() if seed is None else seed
        self.weight = self.init_centers(num_classes, in_channels, init_std,
                                        base_seed,
                                        parse_center_dtype(center_dtype))

    def loss_by_labels(self, embeddings: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Margin softmax of the local batch over all classes."""
        labels = self._check_shapes(embeddings, labels)
        self._check_label_range(labels)
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = self.logit_dtype(embeddings, self.weight)
            cos = F.linear(F.normalize(embeddings.to(dtype), dim=1),
                           F.normalize(self.weight.to(dtype), dim=1))
            cos = cos.clamp(-1.0, 1.0)
            margin = self.margin_loss
            if isinstance(margin, BaseMargin):
                norms = torch.linalg.vector_norm(
                    embeddings.to(dtype), dim=1) if margin.uses_norms else None
                return margin.dense_loss(cos, labels, norms)
            return F.cross_entropy(margin(cos, labels), labels)
