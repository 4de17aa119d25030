"""Face-recognition training sets shipped as MXNet RecordIO (no mxnet)."""
from __future__ import annotations

import copy
import os
from typing import Callable, Sequence

import numpy as np
from mmengine.dataset import BaseDataset, force_full_init

from mmpfc.registry import DATASETS
from mmpfc.utils.arg_checks import (PIPELINE, AnyOf, Bool, Int, Opt, Seq, Str,
                                    arg_specs)

from .recordio import IndexedRecordReader, RecordIOError
from .transforms.builder import build_transforms


def read_property(path: str) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from an insightface ``property`` file
    ("85742,112,112"); anything but three positive integers raises, naming
    the file and its content."""
    with open(path, errors='replace') as f:
        text = f.read().strip()
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f'{path}: expected "num_classes,height,width" '
                         f'(three positive integers), got {text!r}')
    num_classes, height, width = values
    return num_classes, height, width


def write_property(path: str, num_classes: int, height: int,
                   width: int) -> None:
    """The insightface ``property`` file :func:`read_property` reads."""
    with open(path, 'w') as f:
        f.write(f'{num_classes},{height},{width}')


@DATASETS.register_module()
@arg_specs(data_root=Str(), ann_file=Str(empty=False),
           idx_file=Opt(Str(empty=False)), num_classes=Opt(Int(low=1)),
           property_file=Opt(Str()), pipeline=PIPELINE,
           indices=Opt(AnyOf(Int(low=0), Seq(Int(low=0)))),
           test_mode=Bool(), lazy_init=Bool(), max_refetch=Int(low=0))
class MXFaceDataset(BaseDataset):
    """Images and class ids of a ``train.rec`` / ``train.idx`` pair.

    Reads insightface sets (MS1MV2/V3, Glint360K, WebFace): record 0 is a
    meta header (``flag > 0``, no image) whose first label is one past the
    last image key, so images are keys ``1 .. label[0] - 1`` and identity
    records after them are skipped. Files from plain ``im2rec`` have no such
    header: every indexed record is an image. An image's class is its first
    label.

    The index lives in numpy arrays (a few bytes per image, shared by forked
    workers) instead of a serialized ``data_list``: a 42M-image set loads in
    seconds. Each worker opens its own file descriptor. ``get_data_info``
    returns ``gt_label`` (int), the encoded image ``img_bytes`` and
    ``img_source`` (``"<rec>, key <k>"``, for errors); decode it with
    :class:`LoadImageFromBytes`. The example is the lean pipeline of the
    dataset configs (docs/data.md, "Choosing the pipeline").

    ``num_classes`` is checked against the ``property`` file next to the
    record (when it exists) and against every label read; a mismatch raises
    instead of silently training a head of the wrong size.

    Example::

        train_dataloader = dict(
            batch_size=128, num_workers=4, persistent_workers=True,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            collate_fn=dict(type='mmpfc.face_collate'),
            dataset=dict(
                type='MXFaceDataset', data_root='data/ms1m-retinaface-t1',
                num_classes=93431,
                pipeline=[dict(type='LoadImageFromBytes'),
                          dict(type='RandomFlipInPlace', prob=0.5)]))

    Args:
        data_root (str): Folder of the record files and ``property``.
        ann_file (str): The ``.rec`` file, relative to ``data_root``.
        idx_file (str, optional): The ``.idx`` file; defaults to ``ann_file``
            with the extension ``.idx``.
        num_classes (int, optional): Expected number of identities; labels
            must lie in ``[0, num_classes)``. Defaults to the ``property``
            value when that file exists, else labels are not bounded.
        property_file (str, optional): ``property`` file relative to
            ``data_root``; ``None`` to ignore it.
        pipeline (list): Transforms, e.g. decode, flip, pack.
        indices (int | Sequence[int], optional): Keep only this subset.
    """

    def __init__(self,
                 data_root: str = '',
                 ann_file: str = 'train.rec',
                 idx_file: str | None = None,
                 num_classes: int | None = None,
                 property_file: str | None = 'property',
                 pipeline: Sequence[dict | Callable] = (),
                 indices: int | Sequence[int] | None = None,
                 test_mode: bool = False,
                 lazy_init: bool = False,
                 max_refetch: int = 1000) -> None:
        self.idx_file = idx_file
        self.property_file = property_file
        self.num_classes = num_classes
        self.image_size: tuple[int, int] | None = None
        self._keys = np.zeros(0, np.int64)
        super().__init__(ann_file=ann_file, data_root=data_root,
                         indices=indices, serialize_data=False,
                         pipeline=build_transforms(pipeline),
                         test_mode=test_mode,
                         lazy_init=lazy_init, max_refetch=max_refetch)

    def full_init(self) -> None:
        """Parse the index, find the image keys and check ``num_classes``."""
        if self._fully_initialized:
            return
        self._check_property()
        idx_path = self.idx_file
        if idx_path and self.data_root and not os.path.isabs(idx_path):
            idx_path = os.path.join(self.data_root, idx_path)
        self.reader = IndexedRecordReader(self.ann_file, idx_path)
        self._keys = self._image_keys()
        if not len(self._keys):
            raise RecordIOError(f'{self.ann_file}: no image records '
                                f'({self.reader.idx_path} indexes '
                                f'{len(self.reader)} records)')
        if self._indices is not None:
            self._keys = self._select(self._keys, self._indices)
        self._fully_initialized = True

    def _check_property(self) -> None:
        if not self.property_file:
            return
        path = os.path.join(self.data_root, self.property_file)
        if not os.path.isfile(path):
            return
        num_classes, height, width = read_property(path)
        if self.num_classes is not None and self.num_classes != num_classes:
            raise ValueError(f'num_classes={self.num_classes} disagrees with '
                             f'{path}, which says {num_classes} classes')
        self.num_classes = num_classes
        self.image_size = (height, width)

    def _image_keys(self) -> np.ndarray:
        keys = self.reader.keys
        if 0 not in self.reader:
            return keys
        header, labels, payload = self.reader.read_item(0)
        if header.flag == 0 or payload:  # an image: plain im2rec file
            return keys
        end = float(labels[0])
        if not (end.is_integer() and end >= 1):
            raise RecordIOError(
                f'{self.ann_file}, key 0: the meta header\'s first label '
                f'{end} should be one past the last image key (an integer '
                '>= 1)')
        end = int(end)
        # keys are sorted and unique: counting those in [1, end) suffices
        found = int(np.searchsorted(keys, end) - np.searchsorted(keys, 1))
        if found != end - 1:
            raise RecordIOError(
                f'{self.ann_file}: meta header says images are keys 1..'
                f'{end - 1}, but {self.reader.idx_path} has only {found} of '
                'them')
        return np.arange(1, end, dtype=np.int64)

    @staticmethod
    def _select(keys: np.ndarray, indices: int | Sequence[int]) -> np.ndarray:
        if isinstance(indices, int):
            return keys[:indices] if indices >= 0 else keys[indices:]
        return keys[np.asarray(indices, dtype=np.int64)]

    @force_full_init
    def __len__(self) -> int:
        return len(self._keys)

    @force_full_init
    def get_data_info(self, idx: int) -> dict:
        """``gt_label``, ``img_bytes``, ``key``, ``img_source`` and
        ``sample_idx`` of image ``idx``; raises if the record is corrupt or
        its label is out of range."""
        key = int(self._keys[idx])
        header, labels, img_bytes = self.reader.read_item(key)
        return dict(gt_label=self._check_label(key, float(labels[0])),
                    img_bytes=img_bytes, key=key,
                    img_source=f'{self.ann_file}, key {key}',
                    sample_idx=idx if idx >= 0 else len(self) + idx)

    def _check_label(self, key: int, value: float) -> int:
        """``value`` as a class id, or an error naming the file and key
        (a NaN or a fraction is refused too, not truncated by ``int``)."""
        if value.is_integer() and value >= 0 and (
                self.num_classes is None or value < self.num_classes):
            return int(value)
        if self.num_classes is None:
            raise ValueError(f'{self.ann_file}, key {key}: label {value} is '
                             'not a class id (an integer >= 0)')
        raise ValueError(
            f'{self.ann_file}, key {key}: label {value} is not an integer in '
            f'[0, {self.num_classes}); is num_classes={self.num_classes} '
            'right for this file?')

    @force_full_init
    def get_subset_(self, indices: int | Sequence[int]) -> None:
        self._keys = self._select(self._keys, indices)

    @force_full_init
    def get_subset(self, indices: int | Sequence[int]) -> 'MXFaceDataset':
        subset = copy.copy(self)
        subset.get_subset_(indices)
        return subset

    def get_cat_ids(self, idx: int) -> list[int]:
        return [self.get_data_info(idx)['gt_label']]
