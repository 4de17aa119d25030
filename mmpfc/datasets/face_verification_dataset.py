"""Verification pairs (LFW, CFP-FP, AgeDB-30) from insightface ``.bin``."""
from __future__ import annotations

import os
import pickle
from typing import Callable, Sequence

import numpy as np
from mmengine.dataset import BaseDataset, force_full_init

from mmpfc.registry import DATASETS
from .transforms.builder import build_transforms
from .transforms.loading import FlipIfRequested

#: meta keys the verification metric reads; ``PackInputs`` must keep them
VERIFICATION_META_KEYS = ('sample_idx', 'dataset_name', 'image_idx',
                          'is_same', 'flip')


def load_pairs_bin(path: str) -> tuple[list[bytes], list[bool]]:
    """``(2P encoded images, P is-same flags)`` of a ``.bin`` file; pair ``p``
    is images ``2p`` and ``2p + 1``.

    The file is a pickle: unpickling runs code, so open only trusted files.
    """
    with open(path, 'rb') as f:
        # the public files were pickled by Python 2: keep str as bytes
        images, issame = pickle.load(f, encoding='bytes')
    if len(images) != 2 * len(issame):
        raise ValueError(f'{path}: {len(images)} images for {len(issame)} '
                         f'pairs; expected {2 * len(issame)}')
    return [im.tobytes() if isinstance(im, np.ndarray) else bytes(im)
            for im in images], [bool(s) for s in issame]


@DATASETS.register_module()
class FaceVerificationDataset(BaseDataset):
    """Every image of one or more pair files, as is and mirrored.

    Sample ``i`` is image ``i // 2`` of the concatenated ``.bin`` files with
    ``flip = i % 2 == 1`` (``flip_test=False``: sample ``i`` is image ``i``).
    Each sample carries ``dataset_name``, ``image_idx`` (within its file),
    ``is_same`` (of its pair) and ``flip``, from which
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
        info['sample_idx'] = idx
        info['flip'] = self.flip_test and idx % 2 == 1
        info['flip_direction'] = 'horizontal' if info['flip'] else None
        return info
