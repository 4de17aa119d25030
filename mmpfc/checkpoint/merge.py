"""Merge a sharded checkpoint into one file that loads on any world size."""
from __future__ import annotations

import os.path as osp

from .io import CheckpointError, atomic_save, load_file
from .manifest import Manifest, set_manifest
from .rows import CheckpointRows
from .sharded_state import put_row_state


def merge_checkpoint(src: str, dst: str, drop_optimizer: bool = False,
                     overwrite: bool = False) -> dict:
    """Write ``dst``: ``src`` with every sharded tensor whole, in class order.

    ``state_dict[name]`` holds all C rows of each sharded parameter (e.g.
    ``head.weight``), the optimizer state holds their full row-wise state
    (momentum), and the manifest says ``layout='inline'``; message hub and
    schedulers are kept, so the file can be resumed from (on any number of
    ranks; the samplers are reseeded). Needs O(C x D) host memory.

    Args:
        src: Main file of a sharded (or merged) mmpfc checkpoint.
        dst: Output file; refused if it exists unless ``overwrite``.
        drop_optimizer: Leave out the optimizer state (a smaller file for
            deployment or ``load_from``).
        overwrite: Replace an existing ``dst``.

    Returns:
        ``{name: (num_classes, embedding_size)}`` of the merged tensors.
    """
    if osp.abspath(src) == osp.abspath(dst):
        raise CheckpointError(f'refusing to merge {src} onto itself')
    if osp.exists(dst) and not overwrite:
        raise CheckpointError(f'{dst} exists; choose another output or '
                              'allow overwriting it')
    checkpoint = load_file(src, mmap=True)
    source = CheckpointRows(src, checkpoint)
    if source.manifest is None:
        raise CheckpointError(
            f'{src} has no mmpfc manifest (meta["mmpfc"]): it is not a '
            'sharded checkpoint, there is nothing to merge')
    optimizer_state = None if drop_optimizer else checkpoint.get('optimizer')
    params = source.manifest.params
    for name, entry in params.items():
        weight, rows, scalars = source.take(name, 0, entry.num_classes)
        checkpoint['state_dict'][name] = weight
        put_row_state(optimizer_state, entry.optimizer, rows, scalars)
    if drop_optimizer:
        checkpoint.pop('optimizer', None)
    set_manifest(checkpoint, Manifest.inline(params))
    atomic_save(checkpoint, dst)
    return {name: (entry.num_classes, entry.embedding_size)
            for name, entry in params.items()}
