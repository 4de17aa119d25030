"""Write a verification ``.bin`` (insightface layout) from a list of pairs.

Each line of the pairs file is ``path1 path2 is_same`` (``1``/``0``, or
``True``/``False``), paths relative to ``--root``. The output is a pickle of
``(images, issame)``: the 2P encoded image files, byte for byte, with pair
``p`` at ``2p, 2p + 1``, and the P flags; ``FaceVerificationDataset`` reads it.

    python tools/dataset_converters/pairs2bin.py pairs.txt val.bin --root imgs
"""
from __future__ import annotations

import argparse
import os
import pickle
from typing import Sequence

_TRUE, _FALSE = ('1', 'true', 'same'), ('0', 'false', 'diff')


def read_pairs(pairs_file: str) -> list[tuple[str, str, bool]]:
    """``(path1, path2, is_same)`` of each non-empty line."""
    pairs = []
    with open(pairs_file) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            flag = fields[-1].lower() if len(fields) == 3 else None
            if flag not in _TRUE + _FALSE:
                raise ValueError(f'{pairs_file}:{n}: expected "path1 path2 '
                                 f'is_same", got {line.strip()!r}')
            pairs.append((fields[0], fields[1], flag in _TRUE))
    return pairs


def write_pairs_bin(pairs: Sequence[tuple[str, str, bool]], out_file: str,
                    root: str = '') -> None:
    """Pickle the encoded images and flags of ``pairs`` into ``out_file``."""
    images, issame = [], []
    for path1, path2, same in pairs:
        for path in (path1, path2):
            with open(os.path.join(root, path), 'rb') as f:
                images.append(f.read())
        issame.append(bool(same))
    with open(out_file, 'wb') as f:
        pickle.dump((images, issame), f, protocol=4)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('pairs_file', help='"path1 path2 is_same" lines')
    parser.add_argument('out_file', help='the .bin to write')
    parser.add_argument('--root', default='', help='folder of the paths')
    args = parser.parse_args(argv)
    pairs = read_pairs(args.pairs_file)
    write_pairs_bin(pairs, args.out_file, args.root)
    print(f'{len(pairs)} pairs -> {args.out_file}')


if __name__ == '__main__':
    main()
