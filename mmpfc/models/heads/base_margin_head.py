"""What every margin-softmax head of mmpfc shares, sharded or replicated."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import (INIT_CFG, Instance, Int, Opt, Real,
                                    arg_specs)

from .label_check import LabelRangeCheck

#: fp32 elements drawn at a time when initializing 16-bit centers.
INIT_BLOCK_ELEMENTS = 2**24


def build_margin_loss(loss: Union[dict, nn.Module]) -> nn.Module:
    """Build ``loss`` in the mmpfc scope, whatever the caller's scope is.

    From an mmpretrain config (default scope ``mmpretrain``) a bare
    ``type='CombinedMarginLoss'`` would otherwise be looked up in mmpretrain's
    registry and not be found.
    """
    if isinstance(loss, nn.Module):
        return loss
    return MODELS.build({'_scope_': 'mmpfc', **loss})


@arg_specs(num_classes=Int(low=1), in_channels=Int(low=1),
           loss=Instance(dict, nn.Module), init_cfg=INIT_CFG,
           # not taken here, but by every head that draws its centers
           init_std=Real(low=0.0, low_open=True), seed=Opt(Int()))
class BaseMarginHead(BaseModule):
    """Class centers, a margin and the mmpretrain head interface.

    Subclasses own the centers (``weight``, rows ``[class_start, class_start
    + num_local)`` of the ``num_classes`` classes) and implement
    :meth:`loss_by_labels`; this base gives them the argument checks, the
    ``pre_logits / forward / loss / predict`` interface, the label checks and
    the fp32 logit dtype.

    Args:
        num_classes: Total identities C.
        in_channels: Embedding size D.
        loss: Config (or module) of the margin, e.g. ``CombinedMarginLoss``.
        init_cfg: MMEngine init config (unused by the centers themselves).
    """

    def __init__(self, num_classes: int, in_channels: int,
                 loss: Union[dict, nn.Module],
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.margin_loss = build_margin_loss(loss)
        self._label_check = LabelRangeCheck(num_classes)

    @staticmethod
    def init_centers(rows: int, in_channels: int, std: float, seed: int,
                     dtype: torch.dtype = torch.float32) -> nn.Parameter:
        """``rows`` centers drawn from N(0, std^2) by a generator of ``seed``
        (the same values on every device and in every process), stored in
        ``dtype``.

        A 16-bit shard is drawn in fp32 blocks of rows and rounded to
        nearest block by block, so that no fp32 copy of the whole shard
        exists (at 10M identities it would be twice the stored shard).
        """
        generator = torch.Generator().manual_seed(seed % (2**63))
        if dtype == torch.float32:
            return nn.Parameter(torch.empty(rows, in_channels).normal_(
                0.0, std, generator=generator))
        weight = torch.empty(rows, in_channels, dtype=dtype)
        step = max(1, INIT_BLOCK_ELEMENTS // in_channels)
        for start in range(0, rows, step):
            block = torch.empty(min(step, rows - start), in_channels)
            weight[start:start + step] = block.normal_(0.0, std,
                                                       generator=generator)
        return nn.Parameter(weight)

    # ----------------------------------------------------------------- API
    def pre_logits(self, feats: Union[torch.Tensor, Sequence[torch.Tensor]]
                   ) -> torch.Tensor:
        """The embedding: ``feats`` itself or the last item of a tuple."""
        if isinstance(feats, (tuple, list)):
            feats = feats[-1]
        return feats

    def forward(self, feats) -> torch.Tensor:
        """The embedding (logits need labels and are computed in ``loss``)."""
        return self.pre_logits(feats)

    def loss(self, feats, data_samples: Sequence, **kwargs) -> dict:
        """The margin-softmax loss of the batch's ``gt_label``s."""
        labels = self._labels_from(data_samples)
        return dict(loss=self.loss_by_labels(self.pre_logits(feats), labels))

    def loss_by_labels(self, embeddings: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Loss for a (B, D) embedding batch and its (B,) class ids."""
        raise NotImplementedError

    def predict(self, feats, data_samples: Optional[Sequence] = None
                ) -> list:
        """Data samples carrying the embedding.

        ``pred_feat`` is the L2-normalized embedding (what a face model
        compares); ``raw_feat`` is the un-normalized one, which verification
        needs for the flip-sum and XNorm of the insightface protocol.
        """
        from mmpretrain.structures import DataSample
        raw = self.pre_logits(feats).detach().float()
        emb = F.normalize(raw, dim=1)
        if data_samples is None:
            data_samples = [DataSample() for _ in range(emb.shape[0])]
        for sample, vector, raw_vector in zip(data_samples, emb, raw):
            sample.set_field(vector, 'pred_feat', field_type='data')
            sample.set_field(raw_vector, 'raw_feat', field_type='data')
        return list(data_samples)

    # ------------------------------------------------------------- checks
    def _labels_from(self, data_samples: Sequence) -> torch.Tensor:
        try:
            labels = [sample.gt_label for sample in data_samples]
        except AttributeError as err:
            raise ValueError(f'{type(self).__name__}.loss needs data samples '
                             'with gt_label') from err
        return torch.cat([torch.as_tensor(lab).reshape(-1)
                          for lab in labels])

    def _check_shapes(self, embeddings: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings and B labels; the labels as int64."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.in_channels:
            raise ValueError(
                f'{type(self).__name__} expects embeddings of shape (B, '
                f'{self.in_channels}), got {tuple(embeddings.shape)}')
        labels = labels.reshape(-1).long()
        if labels.numel() != embeddings.shape[0]:
            raise ValueError(
                f'{labels.numel()} labels for {embeddings.shape[0]} '
                'embeddings')
        return labels

    def _check_label_range(self, labels: torch.Tensor) -> None:
        """Labels must be in [0, num_classes): at once on the CPU, one step
        late on CUDA (see :class:`.label_check.LabelRangeCheck`)."""
        self._label_check(labels)

    def check_pending_labels(self) -> None:
        """Read a label range check still pending on CUDA (e.g. after the
        last step); raises ValueError for an out-of-range label."""
        self._label_check.flush()

    @staticmethod
    def logit_dtype(embeddings: torch.Tensor,
                    weight: torch.Tensor) -> torch.dtype:
        """fp32 (or wider) logits, whatever autocast or the inputs say."""
        return torch.promote_types(
            torch.promote_types(embeddings.dtype, weight.dtype),
            torch.float32)

    def extra_repr(self) -> str:
        return (f'num_classes={self.num_classes}, '
                f'in_channels={self.in_channels}')
