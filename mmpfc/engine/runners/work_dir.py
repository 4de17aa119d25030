"""What a run may do with its work dir and the checkpoints already in it.

MMEngine starts a new run in a work dir that holds another run's checkpoints
and overwrites them (their shard folders go too) with a note at INFO level,
afterwards; ``last_checkpoint`` stores an absolute path, so a copied work dir
resumes from the original and a moved one fails; two runs in one work dir
write checkpoints into the same folder and delete each other's. Here a
training run holds a lock on its work dir (:class:`WorkDirLock`), a fresh run
refuses a dir with checkpoints unless asked, and ``last_checkpoint`` is
resolved in its own dir.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import os.path as osp
import socket
import sys
import time
from typing import Iterable, List, Optional

from mmpfc.checkpoint.io import write_text_atomically

LAST_CHECKPOINT = 'last_checkpoint'
#: The lock file of a training run, in its work dir.
LOCK_FILE = '.mmpfc-train.lock'
#: Names the launch whose run last started training in the work dir (a
#: torchrun restart of that launch resumes it; any other start does not).
LAUNCH_FILE = '.mmpfc-launch'
_SHARD_DIR_MARK = '.shards-'


class WorkDirInUseError(FileExistsError):
    """A fresh run would overwrite checkpoints it did not write."""


class WorkDirLockedError(WorkDirInUseError):
    """Another run is training in this work dir."""


class WorkDirLock:
    """An exclusive ``flock`` on ``<work_dir>/.mmpfc-train.lock`` while a run
    trains, with the holder (host, PID, start, command) written inside.

    The kernel drops the lock when the holding process ends, however it
    ends (``kill -9`` included), so a dead run never blocks the next; the
    file itself stays and blocks nothing. A filesystem without ``flock``
    support leaves the run unlocked (:attr:`supported` False).
    """

    def __init__(self, work_dir: str) -> None:
        self.path = osp.join(osp.abspath(work_dir), LOCK_FILE)
        self._fd: Optional[int] = None
        self.supported = True

    def acquire(self) -> 'WorkDirLock':
        """Take the lock, or raise :class:`WorkDirLockedError` naming the
        run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkDirLockedError(self._held_message()) from None
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                             errno.EINVAL):
                self.supported = False  # e.g. NFS mounted with nolock
                return self
            raise
        holder = dict(host=socket.gethostname(), pid=os.getpid(),
                      started=time.strftime('%Y-%m-%d %H:%M:%S %z'),
                      command=' '.join(sys.argv))
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (closing the file drops it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _held_message(self) -> str:
        work_dir = osp.dirname(self.path)
        try:
            with open(self.path) as f:
                holder = json.loads(f.read() or '{}')
        except (OSError, ValueError):
            holder = {}
        who = (f"PID {holder.get('pid', '?')} on host "
               f"{holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}"
               + (f" ({holder['command']})" if holder.get('command') else ''))
        return (f'{work_dir} is in use: another run is training there '
                f'({who}; it holds {self.path}). Two runs in one work dir '
                "would write and delete each other's checkpoints. Wait for "
                'it to finish or stop it (its checkpoints stay; resume it '
                'with --resume), or start this run in another folder with '
                '--work-dir.')

    def __enter__(self) -> 'WorkDirLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def launch_identity() -> str:
    """The same in every attempt of one torchrun launch, another in any
    other launch: the per-launch folder of torchrun's error files (made
    once per launch and kept across its attempts, also through wrappers
    such as ``--no-python``), else the host and the workers' parent (the
    agent) with its start time; torchrun's run id is added, but alone it
    may repeat across launches (a fixed ``--rdzv-id``)."""
    run_id = os.environ.get('TORCHELASTIC_RUN_ID', '')
    error_file = os.environ.get('TORCHELASTIC_ERROR_FILE', '')
    if '/attempt_' in error_file:
        launch = error_file.rsplit('/attempt_', 1)[0]
        return f'{socket.gethostname()} {launch} {run_id}'
    agent = os.getppid()
    try:
        with open(f'/proc/{agent}/stat') as f:
            started = f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        started = '?'
    return f'{socket.gethostname()} {agent} {started} {run_id}'


def record_launch(work_dir: str) -> None:
    """Mark the work dir's run as this launch's."""
    write_text_atomically(osp.join(work_dir, LAUNCH_FILE), launch_identity())


def launched_here(work_dir: str) -> bool:
    """Whether this launch started the run in ``work_dir``."""
    try:
        with open(osp.join(work_dir, LAUNCH_FILE)) as f:
            return f.read() == launch_identity()
    except OSError:
        return False


def point_last_checkpoint(work_dir: str, path: Optional[str]) -> None:
    """Make ``last_checkpoint`` name ``path`` (None: remove it), so that a
    requeue or restart before the run's first save starts where it did."""
    record = osp.join(work_dir, LAST_CHECKPOINT)
    if path is None:
        if osp.lexists(record):
            os.remove(record)
    else:
        write_text_atomically(record, osp.abspath(path))


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


def used_work_dir_message(work_dir: str, checkpoint_dirs: Iterable[str],
                          found: List[str],
                          resuming: Optional[str] = None) -> str:
    """Why a run may not start among ``found``, and the ways out."""
    shown = ', '.join(osp.relpath(p, work_dir) for p in found[:6])
    more = f' and {len(found) - 6} more' if len(found) > 6 else ''
    where = ', '.join(dict.fromkeys(osp.abspath(d) for d in checkpoint_dirs))
    if resuming is not None:
        return (
            f'{where} already holds checkpoints of another run ({shown}'
            f'{more}); resuming {resuming}, which lies elsewhere, would '
            'continue that other run here and overwrite or delete them. '
            'Resume it in another folder with --work-dir, or replace them '
            'on purpose with --overwrite (overwrite=True in the config).')
    return (
        f'{where} already holds checkpoints of another run ({shown}{more}); '
        'a new run would overwrite or delete them. Continue that run with '
        '--resume (resume=True), start this one in another folder with '
        '--work-dir, or replace them on purpose with --overwrite '
        '(overwrite=True in the config).')


def lies_in(path: str, folders: Iterable[str]) -> bool:
    """Whether ``path`` is directly in one of ``folders``."""
    parent = osp.realpath(osp.dirname(osp.abspath(path)))
    return any(parent == osp.realpath(osp.abspath(d)) for d in folders)


def resolve_last_checkpoint(work_dir: str,
                            logger=None) -> Optional[str]:
    """The checkpoint named by ``work_dir/last_checkpoint``, in ``work_dir``.

    A relative name is taken relative to ``work_dir`` (or, failing that,
    to the current directory, as MMEngine writes a relative ``out_dir``'s
    files). An absolute one that points elsewhere while a file of the same
    name lies in ``work_dir`` (the dir was copied or moved) resolves to
    that file. Returns None without a
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
    if osp.exists(stored):  # an out_dir outside the work dir: MMEngine
        return osp.abspath(stored)  # writes it as given, maybe relative
    raise FileNotFoundError(
        f'{record} names {stored}, which does not exist, and neither does '
        f'{local}: pass the checkpoint to resume from with --resume PATH')
