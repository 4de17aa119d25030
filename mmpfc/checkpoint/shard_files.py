"""The files of a sharded checkpoint: their names, checks, clean-up.

A checkpoint saved by :class:`~mmpfc.checkpoint.ShardedCheckpointer` is an
ordinary MMEngine file plus one folder of shards::

    iter_10.pth                   replicated part + manifest (written last)
    iter_10.pth.shards-<token>/
        rank0-of2.pth             rank 0's rows, their optimizer state,
        rank1-of2.pth             its sampler and process RNG state

``iter_10.pth`` holds everything MMEngine saves (backbone and other
replicated weights, their optimizer state, schedulers, message hub, meta)
except the sharded entries, and the manifest (:mod:`.manifest`). A merged
checkpoint (``tools/merge_checkpoint.py``) has ``layout='inline'``: the full
(C, D) tensors are in ``state_dict`` / ``optimizer`` and there is no folder.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import shutil
import uuid
from collections import defaultdict
from typing import List

from .checksum import SIDECAR_SUFFIX
from .io import CheckpointError, load_file
from .manifest import Manifest, get_manifest

_SHARD_DIR = re.compile(r'^(?P<main>.+)\.shards-(?P<token>[0-9a-f]{12})$')
# temp files of main files and of their checksum sidecars
_TEMP_FILE = re.compile(
    rf'^\..+\.pth({re.escape(SIDECAR_SUFFIX)})?\.[^.]+\.tmp$')


def new_token() -> str:
    """A random id tying a manifest to the shard folder it was saved with."""
    return uuid.uuid4().hex[:12]


def shard_dir_name(filename: str, token: str) -> str:
    """The shard folder of main file ``filename`` saved with ``token``."""
    return f'{filename}.shards-{token}'


def shard_file_name(rank: int, world_size: int) -> str:
    """The shard file of ``rank`` in its folder."""
    return f'rank{rank}-of{world_size}.pth'


def temp_main_name(filename: str, token: str) -> str:
    """Where the main file is written before it is renamed to ``filename``
    (:func:`remove_stale_shard_dirs` deletes such files left by a crash)."""
    return f'.{filename}.{token}.tmp'


def check_shard_files(main_path: str, manifest: Manifest) -> List[str]:
    """Paths of all shard files; refuse if any is missing or truncated."""
    folder = osp.join(osp.dirname(osp.abspath(main_path)),
                      manifest.shard_dir)
    world_size = manifest.world_size
    paths = [osp.join(folder, shard_file_name(r, world_size))
             for r in range(world_size)]
    missing = [osp.basename(p) for p in paths if not osp.isfile(p)]
    if missing:
        where = folder if osp.isdir(folder) else f'{folder} (folder missing)'
        raise CheckpointError(
            f'checkpoint {main_path} is incomplete: {len(missing)} of '
            f'{world_size} shard files missing in {where}: '
            f'{", ".join(missing)}')
    sizes = manifest.shard_bytes or [None] * world_size
    short = [f'{osp.basename(p)} ({osp.getsize(p)} of {n} bytes)'
             for p, n in zip(paths, sizes)
             if n is not None and osp.getsize(p) != n]
    if short:
        raise CheckpointError(
            f'checkpoint {main_path} is incomplete: shard files truncated '
            f'or replaced: {", ".join(short)}')
    return paths


def _is_orphan_sidecar(path: str) -> bool:
    """A checksum file whose main file is gone (``max_keep_ckpts`` and a
    replaced best checkpoint remove the main file only)."""
    return path.endswith('.pth' + SIDECAR_SUFFIX) and not osp.exists(
        path[:-len(SIDECAR_SUFFIX)])


def remove_stale_shard_dirs(folder: str) -> List[str]:
    """Delete shard folders no main file refers to, temp files, and
    checksum files whose main file is gone.

    A shard folder is stale when its main file is gone (``max_keep_ckpts``
    or a replaced best checkpoint removed it), or when the main file's
    manifest names another folder (an older save of the same file, or one
    interrupted before its main file was written). Returns what was removed.
    """
    groups = defaultdict(list)
    removed = []
    for name in os.listdir(folder):
        path = osp.join(folder, name)
        match = _SHARD_DIR.match(name)
        if match and osp.isdir(path):
            groups[match['main']].append(name)
        elif osp.isfile(path) and (_TEMP_FILE.match(name) or
                                   _is_orphan_sidecar(path)):
            os.remove(path)
            removed.append(name)
    for main, dirs in groups.items():
        keep = None
        main_path = osp.join(folder, main)
        if osp.isfile(main_path) and len(dirs) == 1:
            keep = dirs[0]  # the usual case; no need to read the manifest
        elif osp.isfile(main_path):
            try:
                manifest = get_manifest(load_file(main_path, mmap=True),
                                        main_path)
            except CheckpointError:
                continue  # unreadable main file: leave its folders alone
            keep = None if manifest is None else manifest.shard_dir
        for name in dirs:
            if name != keep:
                shutil.rmtree(osp.join(folder, name), ignore_errors=True)
                removed.append(name)
    return removed
