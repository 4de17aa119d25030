"""What a run may do with the checkpoints already in its work dir.

MMEngine starts a new run in a work dir that holds another run's checkpoints
and overwrites them (their shard folders go too) with a note at INFO level,
afterwards; ``last_checkpoint`` stores an absolute path, so a copied work dir
resumes from the original and a moved one fails. Here a fresh run refuses
such a dir unless asked, and ``last_checkpoint`` is resolved in its own dir.
"""
from __future__ import annotations

import os
import os.path as osp
from typing import Iterable, List, Optional

LAST_CHECKPOINT = 'last_checkpoint'
_SHARD_DIR_MARK = '.shards-'


class WorkDirInUseError(FileExistsError):
    """A fresh run would overwrite checkpoints it did not write."""


def existing_checkpoints(dirs: Iterable[str]) -> List[str]:
    """Checkpoint files, shard folders and ``last_checkpoint`` in ``dirs``."""
    found = []
    for folder in dict.fromkeys(osp.abspath(d) for d in dirs):
        if not osp.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith('.pth') or _SHARD_DIR_MARK in name or \
                    name == LAST_CHECKPOINT:
                found.append(osp.join(folder, name))
    return found


def refuse_used_work_dir(work_dir: str, checkpoint_dirs: Iterable[str],
                         found: List[str]) -> None:
    """Raise :class:`WorkDirInUseError` naming ``found`` and the ways out."""
    shown = ', '.join(osp.relpath(p, work_dir) for p in found[:6])
    more = f' and {len(found) - 6} more' if len(found) > 6 else ''
    where = ', '.join(dict.fromkeys(osp.abspath(d) for d in checkpoint_dirs))
    raise WorkDirInUseError(
        f'{where} already holds checkpoints of another run ({shown}{more}); '
        'a new run would overwrite or delete them. Continue that run with '
        '--resume (resume=True), start this one in another folder with '
        '--work-dir, or replace them on purpose with --overwrite '
        '(overwrite=True in the config).')


def resolve_last_checkpoint(work_dir: str,
                            logger=None) -> Optional[str]:
    """The checkpoint named by ``work_dir/last_checkpoint``, in ``work_dir``.

    A relative name is taken relative to ``work_dir``. An absolute one that
    points elsewhere while a file of the same name lies in ``work_dir`` (the
    dir was copied or moved) resolves to that file. Returns None without a
    ``last_checkpoint``; raises FileNotFoundError when it names a file that
    exists in neither place.
    """
    record = osp.join(work_dir, LAST_CHECKPOINT)
    if not osp.isfile(record):
        return None
    with open(record) as f:
        stored = f.read().strip()
    if not stored:
        raise FileNotFoundError(f'{record} is empty: it should name the '
                                'latest checkpoint')
    local = osp.join(work_dir, stored if not osp.isabs(stored)
                     else osp.basename(stored))
    if osp.exists(local):
        if osp.isabs(stored) and osp.exists(stored) and \
                not osp.samefile(local, stored) and logger is not None:
            logger.warning(
                f'{record} names {stored}, another folder\'s checkpoint: '
                f'resuming from this work dir\'s copy {local}')
        return local
    if osp.isabs(stored) and osp.exists(stored):
        return stored  # a CheckpointHook out_dir outside the work dir
    raise FileNotFoundError(
        f'{record} names {stored}, which does not exist, and neither does '
        f'{local}: pass the checkpoint to resume from with --resume PATH')
