"""Transforms for images that arrive as encoded bytes (RecordIO, ``.bin``)."""
from __future__ import annotations

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform

from mmpfc.registry import TRANSFORMS


@TRANSFORMS.register_module()
class LoadImageFromBytes(BaseTransform):
    """Decode ``results['img_bytes']`` into ``results['img']``.

    The counterpart of mmcv's ``LoadImageFromFile`` for datasets that hold
    the encoded image (``MXFaceDataset``, ``FaceVerificationDataset``), with
    one difference: it yields RGB by default, because ``FaceRecognizer``'s
    data preprocessor expects RGB (insightface's convention, which released
    weights were trained with) and only scales to [-1, 1]. With
    ``channel_order='bgr'`` set ``to_rgb=True`` in the preprocessor. The
    bytes are dropped afterwards so they do not reach the collate step.

    Example::

        pipeline = [dict(type='LoadImageFromBytes'),
                    dict(type='mmpretrain.RandomFlip', prob=0.5),
                    dict(type='mmpretrain.PackInputs')]

    Args:
        key (str): Where the encoded image is. Defaults to ``'img_bytes'``.
        channel_order (str): ``'rgb'`` (default) or ``'bgr'``.
        color_type (str): ``flag`` of ``mmcv.imfrombytes``.
        imdecode_backend (str): ``backend`` of ``mmcv.imfrombytes``.
        to_float32 (bool): Return a float32 image.
    """

    def __init__(self,
                 key: str = 'img_bytes',
                 channel_order: str = 'rgb',
                 color_type: str = 'color',
                 imdecode_backend: str = 'cv2',
                 to_float32: bool = False) -> None:
        if channel_order not in ('rgb', 'bgr'):
            raise ValueError(f"channel_order={channel_order!r}: expected "
                             "'rgb' or 'bgr'")
        self.key = key
        self.channel_order = channel_order
        self.color_type = color_type
        self.imdecode_backend = imdecode_backend
        self.to_float32 = to_float32

    def transform(self, results: dict) -> dict:
        img_bytes = results.pop(self.key)
        img = mmcv.imfrombytes(img_bytes, flag=self.color_type,
                               channel_order=self.channel_order,
                               backend=self.imdecode_backend)
        if img is None:
            where = results.get('key', results.get('sample_idx'))
            raise ValueError(f'cannot decode the {len(img_bytes)}-byte image '
                             f'of sample {where} (corrupt or not an image)')
        if self.to_float32:
            img = img.astype(np.float32)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results

    def __repr__(self) -> str:
        return (f'{self.__class__.__name__}(key={self.key!r}, '
                f'channel_order={self.channel_order!r}, '
                f'color_type={self.color_type!r}, '
                f'imdecode_backend={self.imdecode_backend!r})')


@TRANSFORMS.register_module()
class FlipIfRequested(BaseTransform):
    """Mirror ``results['img']`` when the dataset set ``results['flip']``.

    Test-time flip without randomness: ``FaceVerificationDataset`` emits each
    image twice, once with ``flip=True``, and the verification protocol sums
    the two embeddings. (``RandomFlip`` would overwrite the flag.)

    Example::

        pipeline = [dict(type='LoadImageFromBytes'),
                    dict(type='FlipIfRequested'), ...]
    """

    def transform(self, results: dict) -> dict:
        if results.get('flip', False):
            direction = results.get('flip_direction') or 'horizontal'
            results['img'] = mmcv.imflip(results['img'], direction=direction)
            results['flip_direction'] = direction
        return results
