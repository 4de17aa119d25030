"""Batches of still-encoded images, for decoding on the GPU.

Decoding JPEGs is most of a data loader worker's time. With
``collate_fn=dict(type='mmpfc.encoded_face_collate')`` the workers only
read the bytes and draw the flips; ``FaceDataPreprocessor`` decodes the
batch on the model's device (nvJPEG through ``torchvision.io.decode_jpeg``
on CUDA) and flips it there (:mod:`mmpfc.models.recognizers.jpeg_decode`).
All bytes of a batch, its lengths, flips and labels travel in one
shared-memory block per batch, not one per image or per tensor, and the
worker reuses the block (:mod:`mmpfc.datasets.worker_blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

from mmpfc.registry import FUNCTIONS

from .worker_blocks import batch_tensors, send_batch


@dataclass
class EncodedBatch:
    """Encoded images of one batch and what the device needs of them.

    Attributes:
        data: uint8, every image's bytes one after the other.
        lengths: int64 (B,), the bytes of each image.
        flip: bool (B,), mirror the image left-right after decoding.
        sources: where each image came from (``"train.rec, key 3"``), for
            errors.
    """
    data: torch.Tensor
    lengths: torch.Tensor
    flip: torch.Tensor
    sources: List[str]

    def __len__(self) -> int:
        return len(self.sources)

    def images(self) -> List[torch.Tensor]:
        """One 1-D uint8 tensor (a view) of each image's bytes."""
        return list(torch.split(self.data, self.lengths.tolist()))


@FUNCTIONS.register_module()
def encoded_face_collate(data_batch: Sequence[dict]) -> dict:
    """Samples that still hold ``img_bytes`` (no decoding transform in the
    pipeline; ``RandomFlipInPlace`` only records ``flip``) -> ``inputs``,
    an :class:`EncodedBatch`, and ``data_samples``, the (B,) int64 labels.

    Example::

        train_dataloader = dict(
            collate_fn=dict(type='mmpfc.encoded_face_collate'),
            dataset=dict(pipeline=[dict(type='RandomFlipInPlace')]))
    """
    if not data_batch:
        raise ValueError('encoded_face_collate: empty batch')
    missing = [key for key in ('img_bytes', 'gt_label')
               if key not in data_batch[0]]
    if missing:
        raise TypeError(
            f'encoded_face_collate needs samples with img_bytes and '
            f'gt_label, missing {missing} (found {sorted(data_batch[0])}); '
            'leave LoadImageFromBytes out of the pipeline: the device '
            'decodes the images')
    blobs = [np.frombuffer(s['img_bytes'], np.uint8) for s in data_batch]
    sizes, count = [len(b) for b in blobs], len(blobs)
    # all of it in one block of the batch's (shared, in a worker) memory
    data, lengths, flip, labels = batch_tensors(
        ((sum(sizes), ), torch.uint8), ((count, ), torch.int64),
        ((count, ), torch.bool), ((count, ), torch.int64))
    np.concatenate(blobs, out=data.numpy())
    lengths.copy_(torch.tensor(sizes))
    flip.copy_(torch.tensor([bool(s.get('flip', False)) for s in data_batch]))
    labels.copy_(torch.tensor([int(s['gt_label']) for s in data_batch]))
    sources = [str(s.get('img_source') or
                   f"sample {s.get('key', s.get('sample_idx'))}")
               for s in data_batch]
    return send_batch(
        dict(inputs=EncodedBatch(data, lengths, flip, sources),
             data_samples=labels), (data, lengths, flip, labels))
