"""Write a training set in insightface's RecordIO layout (what
:class:`MXFaceDataset` reads), for ``tools/dataset_converters/folder2rec.py``
and the data benchmark's synthetic set."""
from __future__ import annotations

import numpy as np

from .recordio import IndexedRecordWriter, pack_record

MAX_EXACT_FLOAT32 = 2**24  # labels are float32: larger ids lose precision


class FaceRecordWriter:
    """Append ``(image bytes, label)`` pairs to ``rec_path`` (+ ``.idx``).

    The default layout is insightface's: key 0 a meta header whose labels
    are ``(N + 1, N + 1 + C)``, images at keys ``1..N`` and, on closing, one
    record per identity with the key range ``(first, last + 1)`` of its
    images. ``plain=True`` writes an im2rec-style file instead (images at
    keys ``0..N-1``, nothing else). The counts are announced up front (the
    header comes first) and checked on closing.

    Example::

        with FaceRecordWriter('data/train.rec', num_images=2,
                              num_classes=1) as writer:
            writer.add(jpeg_bytes_a, 0)
            writer.add(jpeg_bytes_b, 0)
    """

    def __init__(self, rec_path: str, num_images: int, num_classes: int,
                 plain: bool = False) -> None:
        if num_classes > MAX_EXACT_FLOAT32:
            raise ValueError(f'{num_classes} identities: RecordIO float32 '
                             f'labels are exact only up to '
                             f'{MAX_EXACT_FLOAT32}')
        self.num_images, self.num_classes = num_images, num_classes
        self.plain = plain
        self._writer = IndexedRecordWriter(rec_path)
        self._key = 0 if plain else 1
        self._ranges = np.zeros((num_classes, 2), np.int64)
        if not plain:
            self._writer.write(0, pack_record(
                [num_images + 1, num_images + 1 + num_classes], b''))

    def add(self, img_bytes: bytes, label: int) -> None:
        """Write the next image record, of class ``label``."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f'label {label} is not in [0, '
                             f'{self.num_classes})')
        key = self._key
        end = self._ranges[label][1]
        if not self.plain and end and end != key:
            raise ValueError(
                f'{self._writer.rec_path}: image {key} is of label {label}, '
                f'whose images ended at {end - 1}: add each identity\'s '
                'images one after the other (an identity record holds one '
                'key range)')
        self._writer.write(key, pack_record(label, img_bytes, id=key))
        first = self._ranges[label][0]
        self._ranges[label] = (first or key, key + 1)
        self._key += 1

    def close(self) -> None:
        """Write the identity records and close the files; raises if the
        number of images written differs from the one announced."""
        written = self._key - (0 if self.plain else 1)
        try:
            if written != self.num_images:
                raise ValueError(f'{self._writer.rec_path}: announced '
                                 f'{self.num_images} images, wrote {written}')
            if not self.plain:
                for label, (start, end) in enumerate(self._ranges):
                    key = self.num_images + 1 + label
                    self._writer.write(key, pack_record([start, end], b'',
                                                        id=key))
        finally:
            self._writer.close()

    def __enter__(self) -> 'FaceRecordWriter':
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
