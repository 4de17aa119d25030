"""Merge a sharded checkpoint into one file that loads on any world size."""
from __future__ import annotations

import os.path as osp
from dataclasses import replace
from typing import Callable, Optional

import torch

from .io import CheckpointError, atomic_save, load_file, refuse_existing
from .manifest import Manifest, set_manifest
from .rows import CheckpointRows
from .sharded_state import put_row_state


def merge_checkpoint(src: str, dst: str, drop_optimizer: bool = False,
                     overwrite: bool = False, keep_dtype: bool = False,
                     note: Optional[Callable[[str], None]] = None) -> dict:
    """Write ``dst``: ``src`` with every sharded tensor whole, in class order.

    ``state_dict[name]`` holds all C rows of each sharded parameter (e.g.
    ``head.weight``), the optimizer state holds their full row-wise state
    (momentum), and the manifest says ``layout='inline'``; message hub and
    schedulers are kept, so the file can be resumed from (on any number of
    ranks; the samplers are reseeded). Needs O(C x D) host memory.

    Every file of ``src`` is verified against the checksum recorded when
    it was written (a mismatch raises :class:`CheckpointError` naming the
    file); ``dst`` gets its own (``<dst>.sum``).

    Args:
        src: Main file of a sharded (or merged) mmpfc checkpoint.
        dst: Output file; refused if it exists unless ``overwrite``.
        drop_optimizer: Leave out the optimizer state (a smaller file for
            deployment or ``load_from``).
        overwrite: Replace an existing ``dst``.
        keep_dtype: Keep 16-bit centers (``center_dtype``) in their dtype;
            by default they are written in fp32 (exact), which any model
            and tool reads. Compact optimizer state is kept as saved either
            way (a run converts it on resume).
        note: Called with a note for every file of ``src`` that carries no
            checksum (saved before checksums), so was not verified.

    Returns:
        ``{name: (num_classes, embedding_size)}`` of the merged tensors.
    """
    if osp.abspath(src) == osp.abspath(dst):
        raise CheckpointError(f'refusing to merge {src} onto itself')
    refuse_existing(dst, overwrite)
    checkpoint = load_file(src, mmap=True)
    source = CheckpointRows(src, checkpoint)
    if source.manifest is None:
        raise CheckpointError(
            f'{src} has no mmpfc manifest (meta["mmpfc"]): it is not a '
            'sharded checkpoint, there is nothing to merge')
    if note is not None:
        for message in source.unverified():
            note(message)
    optimizer_state = None if drop_optimizer else checkpoint.get('optimizer')
    params = dict(source.manifest.params)
    for name, entry in params.items():
        weight, rows, scalars = source.take(name, 0, entry.num_classes)
        if not keep_dtype and weight.dtype in (torch.bfloat16,
                                               torch.float16):
            weight = weight.float()
            params[name] = replace(entry, dtype='float32')
        checkpoint['state_dict'][name] = weight
        put_row_state(optimizer_state, entry.optimizer, rows, scalars)
    if drop_optimizer:
        checkpoint.pop('optimizer', None)
    set_manifest(checkpoint, Manifest.inline(params))
    atomic_save(checkpoint, dst, sidecar=True)
    return {name: (entry.num_classes, entry.embedding_size)
            for name, entry in params.items()}
