"""The face models' data preprocessor: one asynchronous copy per batch."""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from mmpretrain.models import ClsDataPreprocessor
from mmpretrain.structures import DataSample, cat_batch_labels, tensor_split

from mmpfc.datasets.encoded_batch import EncodedBatch
from mmpfc.registry import MODELS

from .jpeg_decode import JpegDecoder

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

    Batches of encoded images (:func:`mmpfc.datasets.encoded_face_collate`)
    are decoded and flipped on the device first (:attr:`jpeg_decoder`).

    It also accepts what :func:`mmpfc.datasets.face_collate` gives: a
    stacked (B, C, H, W) ``inputs`` tensor and ``data_samples`` as a (B,)
    integer tensor of class ids, copied like the images and turned into one
    ``DataSample`` per row with its ``gt_label``: the model sees the same
    data either way.

    Example::

        data_preprocessor=dict(type='mmpfc.FaceDataPreprocessor',
                               mean=[127.5] * 3, std=[127.5] * 3)
    """

    def forward(self, data: dict, training: bool = False) -> dict:
        pin = self.device.type == 'cuda'
        data = dict(data)
        if isinstance(data['inputs'], EncodedBatch):
            data['inputs'] = self.jpeg_decoder(data['inputs'], self.device)
        data['inputs'] = self._copy(stack_on_host(data['inputs'], pin))
        samples = data.get('data_samples')
        if isinstance(samples, torch.Tensor):
            labels = self._copy(stack_on_host(samples, pin))
            data['data_samples'] = labelled_samples(labels)
            if self.to_onehot or self.batch_augments is not None:
                return super().forward(data, training)
            # nothing of ClsDataPreprocessor's label handling applies: skip
            # its second pass over the samples
            out = super().forward(dict(data, data_samples=None), training)
            return dict(out, data_samples=data['data_samples'])
        if _plain_labels(samples):
            labels, splits = cat_batch_labels(
                [sample.gt_label for sample in samples])
            labels = self._copy(stack_on_host(labels, pin))
            for sample, label in zip(samples, tensor_split(labels, splits)):
                sample.set_gt_label(label)
        return super().forward(data, training)

    @property
    def jpeg_decoder(self) -> JpegDecoder:
        """Decodes :func:`mmpfc.datasets.encoded_face_collate` batches on
        this preprocessor's device (made on first use; it counts the images
        that fell back to the CPU)."""
        if getattr(self, '_jpeg_decoder', None) is None:
            self._jpeg_decoder = JpegDecoder()
        return self._jpeg_decoder

    def _copy(self, inputs: Inputs) -> Inputs:
        """A stacked host tensor to the device, without waiting."""
        if isinstance(inputs, torch.Tensor):
            return inputs.to(self.device, non_blocking=True)
        return inputs


def labelled_samples(labels: torch.Tensor) -> List[DataSample]:
    """One ``DataSample`` per entry of the (B,) class ids ``labels``, its
    ``gt_label`` a (1,) view of them (what ``set_gt_label`` stores for an
    int, without reading the value back from the device)."""
    if labels.ndim != 1 or labels.dtype.is_floating_point or \
            labels.dtype == torch.bool:
        raise ValueError(
            'FaceDataPreprocessor: data_samples given as a tensor must hold '
            f'the (B,) integer class ids, got a {labels.dtype} tensor of '
            f'shape {tuple(labels.shape)}')
    samples = []
    for row in labels.long().view(-1, 1):
        sample = DataSample()
        sample.set_field(row, 'gt_label', dtype=torch.Tensor)
        samples.append(sample)
    return samples


def _plain_labels(samples: Sequence) -> bool:
    """True for data samples that all carry ``gt_label`` and no score."""
    return bool(samples) and all(
        isinstance(s, DataSample) and 'gt_label' in s
        and 'gt_score' not in s for s in samples)
