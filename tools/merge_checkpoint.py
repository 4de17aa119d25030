"""Merge the shards of an mmpfc checkpoint into one file.

    python tools/merge_checkpoint.py work_dirs/exp/iter_10000.pth merged.pth

The output's ``state_dict`` holds the full head weight (C rows, class order)
under the head's key (e.g. ``head.weight``); it loads into any number of
ranks with ``load_from`` or ``--resume``. Every input file is verified
against the checksum recorded when it was written, before anything is
written; a damaged one is refused by name. See docs/checkpoints.md.
"""
import argparse
import os.path as osp
import sys
import time

from mmpfc.checkpoint import CheckpointError
from mmpfc.checkpoint.merge import merge_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='main file of a sharded checkpoint')
    parser.add_argument('dst', help='merged output file')
    parser.add_argument('--drop-optimizer', action='store_true',
                        help='leave out the optimizer state (smaller file)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace DST if it exists')
    parser.add_argument('--keep-dtype', action='store_true',
                        help='keep 16-bit centers (center_dtype) as stored '
                        '(default: written as float32, exactly)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        merged = merge_checkpoint(
            args.src, args.dst, args.drop_optimizer, args.overwrite,
            args.keep_dtype,
            note=lambda message: print(f'note: {message}', file=sys.stderr))
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    for name, (classes, dim) in merged.items():
        print(f'{name}: {classes} x {dim}')
    print(f'wrote {args.dst} ({osp.getsize(args.dst) / 2**20:.1f} MiB) in '
          f'{time.perf_counter() - start:.1f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
