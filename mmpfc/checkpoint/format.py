"""The layout of an mmpfc checkpoint and its manifest.

A checkpoint saved by :class:`~mmpfc.engine.runners.ShardedCheckpointMixin`
is an ordinary MMEngine file plus one folder of shards::

    iter_10.pth                   replicated part + manifest (written last)
    iter_10.pth.shards-<token>/
        rank0-of2.pth             rank 0's rows, their optimizer state,
        rank1-of2.pth             its sampler RNG state

``iter_10.pth`` holds everything MMEngine saves (backbone and other
replicated weights, their optimizer state, schedulers, message hub, meta)
except the sharded entries, and ``meta['mmpfc']``, the manifest: format
version, mmpfc version, world size, shard folder, shard file sizes and, for
every sharded parameter, num_classes, embedding size, dtype, the class range
of every rank and where its optimizer state lives. A merged checkpoint
(``tools/merge_checkpoint.py``) has ``layout='inline'``: the full (C, D)
tensors are in ``state_dict`` / ``optimizer`` and there is no folder.
"""
from __future__ import annotations

import os
import os.path as osp
import re
import shutil
import uuid
from collections import defaultdict
from typing import Dict, List, Optional

from mmpfc.version import __version__
from .io import CheckpointError, load_file

FORMAT = 'mmpfc-sharded-checkpoint'
FORMAT_VERSION = 1
MANIFEST_KEY = 'mmpfc'
LAYOUTS = ('shards', 'inline')
_SHARD_DIR = re.compile(r'^(?P<main>.+)\.shards-(?P<token>[0-9a-f]{12})$')
_TEMP_FILE = re.compile(r'^\..+\.pth\.[^.]+\.tmp$')


def new_token() -> str:
    """A random id tying a manifest to the shard folder it was saved with."""
    return uuid.uuid4().hex[:12]


def shard_dir_name(filename: str, token: str) -> str:
    return f'{filename}.shards-{token}'


def shard_file_name(rank: int, world_size: int) -> str:
    return f'rank{rank}-of{world_size}.pth'


def build_manifest(params: Dict[str, dict],
                   world_size: int,
                   layout: str = 'shards',
                   shard_dir: Optional[str] = None,
                   token: Optional[str] = None,
                   shard_bytes: Optional[List[int]] = None,
                   samplers: Optional[List[str]] = None) -> dict:
    """The ``meta['mmpfc']`` entry.

    Args:
        params: Per sharded state-dict key: ``num_classes``,
            ``embedding_size``, ``dtype``, ``class_ranges`` (``[start, stop]``
            per rank), ``optimizer`` (``dict(key, index)`` locating its state
            in the optimizer state dict, or None) and ``row_state`` (names of
            its optimizer state tensors with one row per class).
        world_size: Ranks that saved the shards (1 for ``inline``).
        layout: ``'shards'`` (one file per rank) or ``'inline'``.
        shard_dir: Shard folder, relative to the main file's folder.
        token: Id written into every shard file.
        shard_bytes: Size of every rank's shard file.
        samplers: Modules whose sampler RNG state the shards hold.
    """
    assert layout in LAYOUTS, layout
    return dict(format=FORMAT, format_version=FORMAT_VERSION,
                mmpfc_version=__version__, layout=layout,
                world_size=world_size, shard_dir=shard_dir, token=token,
                shard_bytes=shard_bytes, params=params,
                samplers=list(samplers or []))


def get_manifest(checkpoint: dict, path: str) -> Optional[dict]:
    """The manifest of a loaded checkpoint, or None for a plain checkpoint."""
    meta = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    manifest = meta.get(MANIFEST_KEY) if isinstance(meta, dict) else None
    if manifest is None:
        return None
    if manifest.get('format') != FORMAT:
        raise CheckpointError(f'{path}: meta[{MANIFEST_KEY!r}] is not an '
                              f'mmpfc manifest')
    if manifest.get('format_version', 0) > FORMAT_VERSION:
        raise CheckpointError(
            f'{path} was written by mmpfc {manifest.get("mmpfc_version")} '
            f'in checkpoint format {manifest["format_version"]}; this mmpfc '
            f'({__version__}) reads format <= {FORMAT_VERSION}')
    return manifest


def check_shard_files(main_path: str, manifest: dict) -> List[str]:
    """Paths of all shard files; refuse if any is missing or truncated."""
    folder = osp.join(osp.dirname(osp.abspath(main_path)),
                      manifest['shard_dir'])
    world_size = manifest['world_size']
    paths = [osp.join(folder, shard_file_name(r, world_size))
             for r in range(world_size)]
    missing = [osp.basename(p) for p in paths if not osp.isfile(p)]
    if missing:
        where = folder if osp.isdir(folder) else f'{folder} (folder missing)'
        raise CheckpointError(
            f'checkpoint {main_path} is incomplete: {len(missing)} of '
            f'{world_size} shard files missing in {where}: '
            f'{", ".join(missing)}')
    sizes = manifest.get('shard_bytes') or [None] * world_size
    short = [f'{osp.basename(p)} ({osp.getsize(p)} of {n} bytes)'
             for p, n in zip(paths, sizes)
             if n is not None and osp.getsize(p) != n]
    if short:
        raise CheckpointError(
            f'checkpoint {main_path} is incomplete: shard files truncated '
            f'or replaced: {", ".join(short)}')
    return paths


def remove_stale_shard_dirs(folder: str) -> List[str]:
    """Delete shard folders no main file refers to, and temp files.

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
        elif _TEMP_FILE.match(name) and osp.isfile(path):
            os.remove(path)
            removed.append(name)
    for main, dirs in groups.items():
        keep = None
        main_path = osp.join(folder, main)
        if osp.isfile(main_path) and len(dirs) == 1:
            keep = dirs[0]  # the usual case; no need to read the manifest
        elif osp.isfile(main_path):
            try:
                checkpoint = load_file(main_path, mmap=True)
                manifest = get_manifest(checkpoint, main_path) or {}
                keep = manifest.get('shard_dir')
            except CheckpointError:
                continue  # unreadable main file: leave its folders alone
        for name in dirs:
            if name != keep:
                shutil.rmtree(osp.join(folder, name), ignore_errors=True)
                removed.append(name)
    return removed
