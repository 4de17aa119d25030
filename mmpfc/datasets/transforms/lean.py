"""The lean training pipeline's flip: ``mmpretrain.RandomFlip``'s decisions
without its copy of every flipped image (see :func:`mmpfc.datasets.
face_collate` for the rest of the lean pipeline)."""
from __future__ import annotations

import cv2
import numpy as np
from mmcv.transforms import BaseTransform

from mmpfc.registry import TRANSFORMS
from mmpfc.utils.arg_checks import Real, arg_specs


@TRANSFORMS.register_module()
@arg_specs(prob=Real(0, 1))
class RandomFlipInPlace(BaseTransform):
    """Mirror ``results['img']`` left-right with probability ``prob``,
    writing into the image's own array.

    Draws exactly as ``mmpretrain.RandomFlip(prob, direction='horizontal')``
    does (one ``np.random`` uniform per sample, flipped when it falls below
    numpy's ``choice`` threshold for ``prob``), so under one seed both flip
    the same samples. ``RandomFlip`` returns a view with negative strides
    that ``PackInputs`` then copies; here the array is flipped where it is
    (``cv2.flip``). The decoded image belongs to its sample, so nothing else
    sees the change; a read-only or non-contiguous array is flipped into a
    new one. Sets ``flip`` and ``flip_direction`` as ``RandomFlip`` does;
    samples without ``img`` (images left encoded, to be decoded later) only
    get these flags.

    Example::

        pipeline = [dict(type='LoadImageFromBytes'),
                    dict(type='RandomFlipInPlace', prob=0.5)]

    Args:
        prob (float): Probability of a flip. Defaults to 0.5.
    """

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = float(prob)
        # np.random.choice(['horizontal', None], p=[prob, 1 - prob]) picks
        # 'horizontal' when its uniform draw is below the first entry of
        # the normalized cumulative sum, prob / (prob + (1 - prob))
        self._threshold = self.prob / (self.prob + (1.0 - self.prob))

    def transform(self, results: dict) -> dict:
        if np.random.random_sample() < self._threshold:
            img = results.get('img')
            if img is None:  # still encoded: whoever decodes flips
                pass
            elif img.flags.writeable and img.flags.c_contiguous:
                cv2.flip(img, 1, img)
            else:
                results['img'] = cv2.flip(np.ascontiguousarray(img), 1)
            results['flip'], results['flip_direction'] = True, 'horizontal'
        else:
            results['flip'], results['flip_direction'] = False, None
        return results

    def __repr__(self) -> str:
        return f'{self.__class__.__name__}(prob={self.prob})'
