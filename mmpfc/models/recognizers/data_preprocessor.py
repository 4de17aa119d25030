"""The face models' data preprocessor: one asynchronous copy per batch."""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from mmpretrain.models import ClsDataPreprocessor
from mmpretrain.structures import DataSample, cat_batch_labels, tensor_split

from mmpfc.registry import MODELS

Inputs = Union[torch.Tensor, List[torch.Tensor]]


def stack_on_host(inputs: Inputs, pin: bool) -> Inputs:
    """One (B, ...) host tensor for a list of same-shape tensors.

    With ``pin`` the batch is written straight into page-locked memory, from
    which a ``non_blocking`` copy to the GPU does not wait. Tensors of
    different shapes (padded later by the preprocessor), or already on a
    device, are returned as given.
    """
    if isinstance(inputs, torch.Tensor):
        if pin and inputs.device.type == 'cpu' and not inputs.is_pinned():
            return inputs.pin_memory()
        return inputs
    first = inputs[0] if len(inputs) else None
    if first is None or any(
            not isinstance(x, torch.Tensor) or x.device.type != 'cpu'
            or x.shape != first.shape or x.dtype != first.dtype
            for x in inputs):
        return inputs
    out = torch.empty((len(inputs), *first.shape), dtype=first.dtype,
                      pin_memory=pin)
    return torch.stack(list(inputs), out=out)


@MODELS.register_module()
class FaceDataPreprocessor(ClsDataPreprocessor):
    """mmpretrain's ``ClsDataPreprocessor`` with one copy per batch.

    MMEngine's default collate (``pseudo_collate``) gives a list of images
    and labels in data samples; ``ClsDataPreprocessor`` copies every image
    to the device with its own blocking copy (one host-device
    synchronization per sample), then the labels with another. Here the
    images (all of one shape) are stacked on the host, into pinned memory
    when the model is on CUDA, and copied with one ``non_blocking`` copy;
    the labels likewise, and every data sample gets a view of the copied
    label tensor. The results are ``ClsDataPreprocessor``'s (same
    arguments, same normalization, channel flip and padding).

    Example::

        data_preprocessor=dict(type='mmpfc.FaceDataPreprocessor',
                               mean=[127.5] * 3, std=[127.5] * 3)
    """

    def forward(self, data: dict, training: bool = False) -> dict:
        pin = self.device.type == 'cuda'
        data = dict(data)
        data['inputs'] = self._copy(stack_on_host(data['inputs'], pin))
        samples = data.get('data_samples')
        if _plain_labels(samples):
            labels, splits = cat_batch_labels(
                [sample.gt_label for sample in samples])
            labels = self._copy(stack_on_host(labels, pin))
            for sample, label in zip(samples, tensor_split(labels, splits)):
                sample.set_gt_label(label)
        return super().forward(data, training)

    def _copy(self, inputs: Inputs) -> Inputs:
        """A stacked host tensor to the device, without waiting."""
        if isinstance(inputs, torch.Tensor):
            return inputs.to(self.device, non_blocking=True)
        return inputs


def _plain_labels(samples: Sequence) -> bool:
    """True for data samples that all carry ``gt_label`` and no score."""
    return bool(samples) and all(
        isinstance(s, DataSample) and 'gt_label' in s
        and 'gt_score' not in s for s in samples)
