"""The lean pipeline's collate: packs decoded images straight into one batch
tensor, and the labels into another, instead of a tensor and a
``DataSample`` per image (``PackInputs``) gathered in lists
(``pseudo_collate``)."""
from __future__ import annotations

import functools
from typing import List, Sequence

import cv2
import numpy as np
import torch

from mmpfc.registry import FUNCTIONS

from .worker_blocks import batch_tensors, send_batch


@functools.lru_cache(maxsize=None)
def _split_writes_in_place() -> bool:
    """Whether ``cv2.split(img, planes)`` fills the given arrays (the Python
    binding of OpenCV 4 and 5 does; were a version to return new arrays
    instead, the collate copies through numpy); probed at the first
    batch, not at import."""
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    planes = np.zeros((3, 2, 2), np.uint8)
    cv2.split(img, list(planes))
    return bool(np.array_equal(planes, img.transpose(2, 0, 1)))


#: dtypes OpenCV splits (others are copied by numpy)
_CV_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16,
                                         np.int16, np.int32, np.float32,
                                         np.float64))


@FUNCTIONS.register_module()
def face_collate(data_batch: Sequence[dict]) -> dict:
    """Pack the pipeline's ``img`` (H, W[, C] arrays) into ``inputs``, one
    contiguous (B, C, H, W) tensor, and ``gt_label`` into
    ``data_samples``, a (B,) int64 tensor.

    The images' values are those ``mmpretrain.PackInputs`` would give
    (same dtype, channels first); the batch is the only copy made of them:
    each image's channels are written into their planes with ``cv2.split``.
    In a DataLoader worker the batch and its labels are written into one of
    the worker's reusable shared-memory blocks, copied out of it once in the
    main process (:mod:`mmpfc.datasets.worker_blocks`); a collate wrapping
    this one adds its keys to the returned dict rather than building a new
    one, which would keep the block from coming back (slower, and warned).
    ``FaceDataPreprocessor`` (``FaceRecognizer``'s default) accepts the
    labels tensor: it copies it to the device and gives the head one
    ``DataSample`` per row with its ``gt_label``, as for ``pseudo_collate``
    batches; a model with another preprocessor needs ``pseudo_collate``
    and ``mmpretrain.PackInputs``.

    Example::

        train_dataloader = dict(
            collate_fn=dict(type='mmpfc.face_collate'),
            dataset=dict(type='MXFaceDataset', pipeline=[
                dict(type='LoadImageFromBytes'),
                dict(type='RandomFlipInPlace', prob=0.5)]))
    """
    images = _images_of_one_size(data_batch)
    shape, dtype = images[0].shape, images[0].dtype
    channels = shape[2] if len(shape) == 3 else 1
    out, labels = batch_tensors(
        ((len(images), channels, *shape[:2]), torch_dtype(dtype)),
        ((len(images), ), torch.int64))
    batch = out.numpy()
    planes = list(batch.reshape(-1, *shape[:2]))  # (H, W) views
    split = channels > 1 and dtype in _CV_DTYPES and _split_writes_in_place()
    for i, img in enumerate(images):
        if split:
            cv2.split(np.ascontiguousarray(img),
                      planes[i * channels:(i + 1) * channels])
        else:
            batch[i] = img.reshape(*shape[:2], channels).transpose(2, 0, 1)
    labels.copy_(torch.tensor([sample['gt_label'] for sample in data_batch],
                              dtype=torch.int64))
    return send_batch(dict(inputs=out, data_samples=labels), (out, labels))


def _images_of_one_size(data_batch: Sequence[dict]) -> List[np.ndarray]:
    """The samples' ``img`` arrays; errors naming what cannot be stacked."""
    if not data_batch:
        raise ValueError('face_collate: empty batch')
    first = data_batch[0]
    if not (isinstance(first, dict) and 'gt_label' in first and
            isinstance(first.get('img'), np.ndarray)):
        found = sorted(first) if isinstance(first, dict) else type(first)
        raise TypeError(
            'face_collate packs pipeline results holding "img" (a numpy '
            f'image) and "gt_label", got {found}; end the pipeline before '
            'packing (no PackInputs), or with mmpretrain.PackInputs use '
            "collate_fn=dict(type='pseudo_collate')")
    images = [sample['img'] for sample in data_batch]
    shape, dtype = first['img'].shape, first['img'].dtype
    for i, img in enumerate(images):
        if img.shape != shape or img.dtype != dtype:
            raise ValueError(
                f'face_collate: sample {i} of the batch is a {img.dtype} '
                f'image of shape {img.shape}, sample 0 a {dtype} one of '
                f'shape {shape}; give every image one size in the pipeline')
    if len(shape) not in (2, 3):
        raise ValueError(f'face_collate: expected (H, W) or (H, W, C) '
                         f'images, got shape {shape}')
    return images


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of numpy ``dtype``."""
    return torch.from_numpy(np.empty(0, dtype)).dtype
