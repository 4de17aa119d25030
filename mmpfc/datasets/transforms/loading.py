"""Transforms for images that arrive as encoded bytes (RecordIO, ``.bin``),
and the decoding helpers that name where an undecodable image came from
(shared by the datasets, ``mmpfc.apis`` and ``tools/eval_ijb.py``)."""
from __future__ import annotations

import os

import cv2
import mmcv
import numpy as np
from mmcv.image.io import imread_flags
from mmcv.transforms import BaseTransform

from mmpfc.registry import TRANSFORMS
from mmpfc.utils.arg_checks import Bool, OneOf, Str, arg_specs

#: ``backend`` values of ``mmcv.imfrombytes``
DECODE_BACKENDS = ('cv2', 'turbojpeg', 'pillow', 'tifffile')
_IMREAD_COLOR_RGB = getattr(cv2, 'IMREAD_COLOR_RGB', None)


def decode_image(data: bytes,
                 source: str,
                 flag: str = 'color',
                 channel_order: str = 'rgb',
                 backend: str = 'cv2') -> np.ndarray:
    """``mmcv.imfrombytes(data)``, or a ``ValueError`` that names ``source``.

    Bytes that are not an image fail in each backend its own way: cv2 returns
    ``None`` (which mmcv hands to ``cvtColor`` for RGB, raising a
    ``cv2.error`` that names nothing), pillow raises, an empty buffer trips
    an assertion. All of them end here as one error that says where the
    bytes came from (``source``, e.g. ``"train.rec, key 3"``) and what they
    look like.
    """
    cause = None
    try:
        if (backend, flag, channel_order) == ('cv2', 'color', 'rgb') and \
                _IMREAD_COLOR_RGB is not None:
            # straight into RGB (OpenCV >= 4.10): mmcv's pixels (a BGR
            # decode, then a conversion), one pass less
            img = cv2.imdecode(np.frombuffer(data, np.uint8),
                               _IMREAD_COLOR_RGB)
        else:
            img = mmcv.imfrombytes(data, flag=flag,
                                   channel_order=channel_order,
                                   backend=backend)
    except Exception as err:  # the backend's own error: chained below
        img, cause = None, err
    if img is None:
        raise ValueError(
            f'{source}: cannot decode the image bytes ({len(data)} bytes, '
            f'starts with {bytes(data[:8])!r}): not an image, or corrupt'
        ) from cause
    return img


def read_image_file(path: str, channel_order: str = 'rgb') -> np.ndarray:
    """The decoded colour image of file ``path``.

    ``cv2.imread`` answers ``None`` both for a missing file and for one that
    is not an image; this tells the two apart: ``FileNotFoundError`` when
    ``path`` is not a file, the ``ValueError`` of :func:`decode_image` when
    its bytes are not an image.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image file {path} does not exist')
    with open(path, 'rb') as f:
        data = f.read()
    return decode_image(data, path, channel_order=channel_order)


@TRANSFORMS.register_module()
# (an unknown flag or backend would fail every image as "cannot decode")
@arg_specs(key=Str(empty=False), channel_order=OneOf('rgb', 'bgr'),
           color_type=OneOf(*imread_flags),
           imdecode_backend=OneOf(*DECODE_BACKENDS), to_float32=Bool())
class LoadImageFromBytes(BaseTransform):
    """Decode ``results['img_bytes']`` into ``results['img']``.

    The counterpart of mmcv's ``LoadImageFromFile`` for datasets that hold
    the encoded image (``MXFaceDataset``, ``FaceVerificationDataset``), with
    one difference: it yields RGB by default, because ``FaceRecognizer``'s
    data preprocessor expects RGB (insightface's convention, which released
    weights were trained with) and only scales to [-1, 1]. With
    ``channel_order='bgr'`` set ``to_rgb=True`` in the preprocessor. The
    bytes are dropped afterwards so they do not reach the collate step.
    Bytes that are not an image raise a ``ValueError`` naming
    ``results['img_source']`` (the file and record key or image index, set
    by the datasets), else the sample's ``key`` / ``sample_idx``.

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
        self.key = key
        self.channel_order = channel_order
        self.color_type = color_type
        self.imdecode_backend = imdecode_backend
        self.to_float32 = to_float32

    def transform(self, results: dict) -> dict:
        img_bytes = results.pop(self.key)
        source = results.get('img_source') or (
            f"sample {results.get('key', results.get('sample_idx'))}")
        img = decode_image(img_bytes, source, flag=self.color_type,
                           channel_order=self.channel_order,
                           backend=self.imdecode_backend)
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
