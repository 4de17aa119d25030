"""Reading and writing checkpoint files: atomic writes, errors that say why.

Every file a checkpoint consists of is written to a temporary name in the
target folder, flushed to disk and renamed over the final name
(``os.replace``), so a crash mid-save never leaves a half-written file under a
name that a loader would trust.
"""
from __future__ import annotations

import contextlib
import os
import os.path as osp
import pickle
import tempfile
import zipfile
from typing import Any, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why."""


def atomic_save(obj: Any, path: str, fsync: bool = True) -> int:
    """``torch.save(obj)`` to ``path`` through a temp file and ``os.replace``.

    Returns the size of the written file in bytes. The folder must exist.
    """
    folder = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.',
                               suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return osp.getsize(path)


def load_file(path: str,
              what: str = 'checkpoint',
              map_location: Any = 'cpu',
              mmap: bool = False,
              expected_size: Optional[int] = None) -> Any:
    """``torch.load`` with errors that name the file and the problem.

    Args:
        path: File to read.
        what: How the file is called in error messages.
        map_location: As for ``torch.load``.
        mmap: Map tensor storages instead of reading them (only the rows
            used are then read from disk).
        expected_size: Size recorded when the file was written; a file of
            another size is refused as truncated or replaced.
    """
    if not osp.isfile(path):
        raise CheckpointError(f'{what} {path} does not exist')
    size = osp.getsize(path)
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f'{what} {path} has {size} bytes but {expected_size} were '
            'written: the file is truncated or was replaced')
    try:
        return torch.load(path, map_location=map_location, mmap=mmap)
    except RuntimeError as err:
        if not mmap or 'zipfile' not in str(err):
            raise _unreadable(what, path, size, err) from err
        # a legacy (pre torch 1.6) file cannot be memory-mapped: read it
        return load_file(path, what, map_location, False, expected_size)
    except pickle.UnpicklingError as err:
        if 'weights only' in str(err).lower():
            raise CheckpointError(
                f'{what} {path} holds Python objects that torch.load '
                f'refuses with weights_only=True: {err}') from err
        raise _unreadable(what, path, size, err) from err
    except (EOFError, ValueError, zipfile.BadZipFile) as err:
        raise _unreadable(what, path, size, err) from err


def _unreadable(what: str, path: str, size: int,
                err: Exception) -> CheckpointError:
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    return CheckpointError(
        f'cannot read {what} {path} ({size} bytes): the file is truncated '
        f'or corrupt ({first_line})')
