"""Pack ``root/<identity>/<image>`` into ``train.rec``, ``.idx``, ``property``.

Identities are the sorted sub-folder names, numbered from 0 (the numbering of
``FaceImageFolder``); images are copied byte for byte, so align them to
112x112 first. The default layout is insightface's: key 0 a meta header
whose labels are ``(N + 1, N + 1 + C)``, images at keys ``1..N`` and one record
per identity after them with the key range ``(first, last + 1)`` of its
images. ``--plain`` writes an im2rec-style file instead (images at keys
``0..N-1``, nothing else).

    python tools/dataset_converters/folder2rec.py data/my_faces data/my_rec
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import cv2
import numpy as np

from mmpfc.datasets.face_record_writer import FaceRecordWriter
from mmpfc.datasets.mx_face_dataset import write_property

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def scan_folder(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS
                ) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted identity names and ``(path, label)`` of every image."""
    names = sorted(d for d in os.listdir(root)
                   if os.path.isdir(os.path.join(root, d)))
    if not names:
        raise FileNotFoundError(f'no identity sub-folders in {root}')
    samples = []
    for label, name in enumerate(names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder)
                       if f.lower().endswith(tuple(extensions)))
        samples += [(os.path.join(folder, f), label) for f in files]
    if not samples:
        raise FileNotFoundError(f'no {extensions} images under {root}')
    return names, samples


def folder_to_rec(root: str, out_dir: str, prefix: str = 'train',
                  plain: bool = False) -> dict:
    """Write ``{prefix}.rec/.idx`` and ``property`` into ``out_dir``.

    Returns ``num_classes``, ``num_images`` and ``image_size`` (H, W).
    """
    names, samples = scan_folder(root)
    num_classes, num_images = len(names), len(samples)
    first = cv2.imdecode(np.fromfile(samples[0][0], np.uint8),
                         cv2.IMREAD_COLOR)
    if first is None:
        raise ValueError(f'cannot decode {samples[0][0]}')
    os.makedirs(out_dir, exist_ok=True)
    rec_path = os.path.join(out_dir, f'{prefix}.rec')
    with FaceRecordWriter(rec_path, num_images, num_classes,
                          plain) as writer:
        for path, label in samples:
            with open(path, 'rb') as f:
                writer.add(f.read(), label)
    height, width = first.shape[:2]
    write_property(os.path.join(out_dir, 'property'), num_classes, height,
                   width)
    return dict(num_classes=num_classes, num_images=num_images,
                image_size=(height, width))


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', help='folder of identity sub-folders')
    parser.add_argument('out_dir', help='where train.rec/.idx/property go')
    parser.add_argument('--prefix', default='train', help='file name stem')
    parser.add_argument('--plain', action='store_true',
                        help='im2rec layout: no meta header, keys from 0')
    args = parser.parse_args(argv)
    info = folder_to_rec(args.root, args.out_dir, args.prefix, args.plain)
    print(f'{info["num_images"]} images of {info["num_classes"]} identities '
          f'-> {os.path.join(args.out_dir, args.prefix)}.rec')
    return info


if __name__ == '__main__':
    main()
