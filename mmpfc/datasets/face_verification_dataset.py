"""Verification pairs (LFW, CFP-FP, AgeDB-30) from insightface ``.bin``."""
from __future__ import annotations

import os
import pickle
from typing import Callable, Sequence

import numpy as np
from mmengine.dataset import BaseDataset, force_full_init

from mmpfc.registry import DATASETS
from mmpfc.utils.arg_checks import (PIPELINE, AnyOf, Bool, Opt, Seq, Str,
                                    arg_specs)

from .transforms.builder import build_transforms
from .transforms.loading import FlipIfRequested

#: meta keys the verification metric reads; ``PackInputs`` must keep them
VERIFICATION_META_KEYS = ('sample_idx', 'dataset_name', 'image_idx',
                          'is_same', 'flip')


#: what a ``.bin`` holds, quoted by the errors about its layout
BIN_LAYOUT = ('a pickle of (list of 2P encoded images, list of P is-same '
              'bools), pair p being images 2p and 2p + 1')


def load_pairs_bin(path: str) -> tuple[list[bytes], list[bool]]:
    """``(2P encoded images, P is-same flags)`` of a ``.bin`` file; pair ``p``
    is images ``2p`` and ``2p + 1``.

    Every part of the layout is checked, and a ``ValueError`` names the file
    (and the image or pair) and what was expected: a file that does not
    unpickle, another structure, a count that does not match, an image that
    is not encoded bytes, a flag that is not a bool or 0/1 (a string
    ``'False'`` would count as true). The file is a pickle: unpickling runs
    code, so open only trusted files.
    """
    content = _unpickle(path)
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise ValueError(f'{path}: holds {_describe(content)}; expected '
                         f'{BIN_LAYOUT}')
    images, issame = content
    for what, part in (('images', images), ('is-same flags', issame)):
        if not isinstance(part, (tuple, list, np.ndarray)):
            raise ValueError(f'{path}: the {what} are {_describe(part)}; '
                             f'expected {BIN_LAYOUT}')
    if len(issame) == 0 or len(images) != 2 * len(issame):
        raise ValueError(f'{path}: {len(images)} images for {len(issame)} '
                         f'pairs; expected {BIN_LAYOUT}')
    return ([_image_bytes(path, i, img) for i, img in enumerate(images)],
            [_is_same(path, p, flag) for p, flag in enumerate(issame)])


def _unpickle(path: str) -> object:
    """The object pickled in ``path``; a damaged pickle fails in many ways
    (``EOFError``, ``UnpicklingError``, ``KeyError``, ...), none of which
    names the file, so each becomes one ``ValueError`` that does."""
    with open(path, 'rb') as f:
        try:
            # the public files were pickled by Python 2: keep str as bytes
            return pickle.load(f, encoding='bytes')
        except Exception as err:
            raise ValueError(
                f'{path}: cannot unpickle it ({type(err).__name__}: {err}); '
                f'truncated, or not a pairs file? Expected {BIN_LAYOUT}'
            ) from err


def _image_bytes(path: str, index: int, image: object) -> bytes:
    """Encoded image ``index`` as bytes. Anything else is refused here:
    ``bytes(5)`` would silently give five zero bytes, and decoded pixels
    would only fail much later, at decoding."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 \
            and image.ndim == 1:
        return image.tobytes()
    raise ValueError(f'{path}, image {index}: {_describe(image)} is not an '
                     'encoded image (bytes or a 1-D uint8 array)')


def _is_same(path: str, pair: int, flag: object) -> bool:
    """The flag of ``pair``: a bool, numpy bool or 0/1 integer. Strings
    and other values are refused, since ``bool('False')`` is ``True``."""
    if isinstance(flag, (bool, np.bool_)) or (
            isinstance(flag, (int, np.integer)) and flag in (0, 1)):
        return bool(flag)
    raise ValueError(f'{path}, pair {pair}: is-same flag {flag!r} '
                     f'({type(flag).__name__}) is not a bool (or 0/1)')


def _describe(value: object) -> str:
    """What a file holds instead of the expected layout, briefly."""
    text = f'a value of type {type(value).__name__}'
    if isinstance(value, np.ndarray):
        return f'{text} (shape {value.shape}, dtype {value.dtype})'
    if hasattr(value, '__len__'):
        return f'{text} (length {len(value)})'
    return f'{text} ({repr(value)[:40]})'


@DATASETS.register_module()
@arg_specs(ann_file=AnyOf(Str(empty=False), Seq(Str(empty=False))),
           data_root=Str(), names=Opt(Seq(Str(empty=False))),
           flip_test=Bool(), pipeline=Opt(PIPELINE), lazy_init=Bool())
class FaceVerificationDataset(BaseDataset):
    """Every image of one or more pair files, as is and mirrored.

    Sample ``i`` is image ``i // 2`` of the concatenated ``.bin`` files with
    ``flip = i % 2 == 1`` (``flip_test=False``: sample ``i`` is image ``i``).
    Each sample carries ``dataset_name``, ``image_idx`` (within its file),
    ``is_same`` (of its pair), ``flip`` and ``img_source`` (file and image,
    for decoding errors); from the first four
    ``FaceVerificationMetric`` rebuilds the pairs of each set: samples may
    arrive in any order and from any rank. Several files in one dataset keep
    one ``data_root`` for configs to override. The pipeline must decode
    (``LoadImageFromBytes``), mirror (``FlipIfRequested``) and pack those
    keys (``PackInputs(meta_keys=VERIFICATION_META_KEYS)``): the default
    pipeline does exactly that.

    Example::

        val_dataloader = dict(
            batch_size=128, num_workers=2,
            sampler=dict(type='DefaultSampler', shuffle=False),
            dataset=dict(type='FaceVerificationDataset',
                         data_root='data/ms1m-retinaface-t1',
                         ann_file=['lfw.bin', 'cfp_fp.bin', 'agedb_30.bin']))
        val_evaluator = dict(type='FaceVerificationMetric')

    Args:
        ann_file (str | list[str]): ``.bin`` files, relative to ``data_root``.
        data_root (str): Folder of the files.
        names (list[str], optional): Set names in the metric keys
            (``lfw/accuracy``); default to the file names without extension.
        flip_test (bool): Also emit the mirrored images (the protocol).
        pipeline (list, optional): Defaults to decode, flip-if-asked, pack.
    """

    def __init__(self,
                 ann_file: str | Sequence[str],
                 data_root: str = '',
                 names: Sequence[str] | None = None,
                 flip_test: bool = True,
                 pipeline: Sequence[dict | Callable] | None = None,
                 lazy_init: bool = False) -> None:
        files = [ann_file] if isinstance(ann_file, str) else list(ann_file)
        self.ann_files = [os.path.join(data_root, f) for f in files]
        self.names = list(names) if names else [
            os.path.splitext(os.path.basename(f))[0] for f in files]
        if len(self.names) != len(files) or len(set(self.names)) < len(files):
            raise ValueError(f'names={self.names} must be distinct, one per '
                             f'ann_file={files}')
        self._paths = dict(zip(self.names, self.ann_files))
        self.flip_test = flip_test
        if pipeline is None:
            pipeline = [
                dict(type='LoadImageFromBytes'),
                dict(type='FlipIfRequested'),
                dict(type='mmpretrain.PackInputs',
                     meta_keys=VERIFICATION_META_KEYS)
            ]
        super().__init__(ann_file='', data_root=data_root,
                         pipeline=build_transforms(pipeline), test_mode=True,
                         lazy_init=lazy_init)
        has_flip = any(isinstance(t, FlipIfRequested)
                       for t in self.pipeline.transforms)
        if flip_test and not has_flip:
            raise ValueError('flip_test=True needs FlipIfRequested in the '
                             f'pipeline, got {self.pipeline}')

    def load_data_list(self) -> list[dict]:
        data_list = []
        for path, name in zip(self.ann_files, self.names):
            images, issame = load_pairs_bin(path)
            data_list += [
                dict(img_bytes=img, image_idx=i, is_same=issame[i // 2],
                     dataset_name=name) for i, img in enumerate(images)
            ]
        return data_list

    @force_full_init
    def __len__(self) -> int:
        return super().__len__() * (2 if self.flip_test else 1)

    @force_full_init
    def get_data_info(self, idx: int) -> dict:
        idx = idx if idx >= 0 else len(self) + idx
        image = idx // 2 if self.flip_test else idx
        info = super().get_data_info(image)
        info['img_source'] = (f"{self._paths[info['dataset_name']]}, image "
                              f"{info['image_idx']}")
        info['sample_idx'] = idx
        info['flip'] = self.flip_test and idx % 2 == 1
        info['flip_direction'] = 'horizontal' if info['flip'] else None
        return info
