"""Reading and writing checkpoint files: atomic writes, errors that say why.

Every file a checkpoint consists of is written to a temporary name in the
target folder, flushed to disk and renamed over the final name
(``os.replace``), so a crash mid-save never leaves a half-written file under a
name that a loader would trust. Files are checksummed when they are
written and verified before they are read (:mod:`.checksum`).
"""
from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
import pickle
import struct
import tempfile
import zipfile
from functools import partial
from typing import Any, BinaryIO, Callable, NamedTuple, Optional

import torch

from mmpfc.utils.compat import torch_load

from .checksum import (file_checksum, sidecar_path, sync_and_checksum,
                       verify_checksum, verify_main_file)
from .errors import CheckpointError

#: how the two formats of ``torch.save`` begin: a zip archive, or (before
#: torch 1.6, and with ``_use_new_zipfile_serialization=False``) a pickle
#: whose first object is this magic number, stored as a 10-byte LONG1
_ZIP_MAGIC = b'PK\x03\x04'
_LEGACY_MAGIC = b'\x8a\x0a' + (0x1950A86A20F9469CFC6C).to_bytes(10, 'little')
#: what ``torch.load`` raises on a damaged file, depending on where it breaks
_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, KeyError,
                IndexError, AttributeError, struct.error, zipfile.BadZipFile)


class SavedFile(NamedTuple):
    """What :func:`atomic_save` wrote."""
    size: int  # bytes
    checksum: str  # of those bytes (:mod:`.checksum`)


def atomic_save(obj: Any, path: str, fsync: bool = True,
                sidecar: bool = False) -> SavedFile:
    """``torch.save(obj)`` to ``path`` through a temp file and ``os.replace``.

    Returns the size and checksum of the written file (read back from the
    page cache while ``fsync`` flushes it to disk, which hides the cost).
    With ``sidecar``, the checksum is also recorded next to the file
    (``<path>.sum``): for a main file, which no manifest lists. The folder
    must exist.
    """
    return _write_atomically(path, partial(torch.save, obj), fsync, sidecar)


def refuse_existing(path: str, overwrite: bool) -> None:
    """A tool's output file must not replace one unless asked to."""
    if osp.exists(path) and not overwrite:
        raise CheckpointError(f'{path} exists; choose another output or '
                              'allow overwriting it')


def replace_recorded(tmp_path: str, path: str, saved: SavedFile) -> None:
    """``os.replace(tmp_path, path)`` and record ``saved`` (its size and
    checksum) in ``path``'s sidecar. An older sidecar is deleted first: a
    crash in between leaves a file without one, never with a wrong one."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(sidecar_path(path))
    os.replace(tmp_path, path)
    record = json.dumps(dict(file=osp.basename(path), bytes=saved.size,
                             checksum=saved.checksum)) + '\n'
    write_text_atomically(sidecar_path(path), record)


def write_text_atomically(path: str, text: str) -> None:
    """``text`` to ``path`` through a synced temp file and ``os.replace``:
    a crash leaves the old file or the new one, never a part."""
    _write_atomically(path, lambda f: f.write(text.encode()))


def _write_atomically(path: str, write: Callable[[BinaryIO], Any],
                      fsync: bool = True,
                      sidecar: bool = False) -> SavedFile:
    """``write(file)`` to a temp file that is synced, checksummed and
    renamed over ``path`` (see :func:`atomic_save`)."""
    folder = osp.dirname(osp.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}.',
                               suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        saved = SavedFile(osp.getsize(tmp), sync_and_checksum(tmp) if fsync
                          else file_checksum(tmp))
        if sidecar:
            replace_recorded(tmp, path, saved)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return saved


def load_file(path: str,
              what: str = 'checkpoint',
              map_location: Any = 'cpu',
              mmap: bool = False,
              expected_size: Optional[int] = None,
              checksum: Optional[str] = None) -> Any:
    """``torch.load`` with errors that name the file and the problem.

    Every failure is a :class:`CheckpointError` naming ``path``: missing,
    empty, not written by ``torch.save`` (with its first bytes), of another
    size or checksum than recorded, truncated or corrupt, or holding objects
    that ``weights_only`` loading refuses. Without ``checksum``, a file
    with a checksum sidecar (a main file, ``<path>.sum``) is verified
    against it; one without is read unchecked.

    Args:
        path: File to read.
        what: How the file is called in error messages.
        map_location: As for ``torch.load``.
        mmap: Map tensor storages instead of reading them (only the rows
            used are then read from disk).
        expected_size: Size recorded when the file was written; a file of
            another size is refused as truncated or replaced.
        checksum: Checksum recorded when the file was written (a shard's,
            from the manifest); a file with another one is refused.
    """
    if not osp.isfile(path):
        raise CheckpointError(f'{what} {path} does not exist')
    size = osp.getsize(path)
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f'{what} {path} has {size} bytes but {expected_size} were '
            'written: the file is truncated or was replaced')
    if checksum is not None:
        verify_checksum(path, checksum, what)
    else:
        verify_main_file(path, what)
    _check_torch_format(what, path, size)
    try:
        return torch_load(path, map_location=map_location, mmap=mmap)
    except pickle.UnpicklingError as err:
        if 'weights only' in str(err).lower():
            raise CheckpointError(
                f'{what} {path} holds Python objects that torch.load '
                f'refuses with weights_only=True: {err}') from err
        raise _unreadable(what, path, size, err) from err
    except _LOAD_ERRORS as err:
        raise _unreadable(what, path, size, err) from err


def _check_torch_format(what: str, path: str, size: int) -> None:
    """Refuse a file that ``torch.save`` did not write, by its first bytes.

    ``torch.load`` on such a file (a text file, a plain pickle, a config
    given by mistake) fails with messages that mislead (``KeyError: 101``,
    a "weights only" complaint) or name nothing; the first bytes say what
    the file is instead.
    """
    if size == 0:
        raise CheckpointError(f'cannot read {what} {path} (0 bytes): the '
                              'file is empty (truncated?)')
    with open(path, 'rb') as f:
        head = f.read(32)
    if not head.startswith(_ZIP_MAGIC) and _LEGACY_MAGIC not in head:
        raise CheckpointError(
            f'{what} {path} is not a torch checkpoint (starts with '
            f'{head[:16]!r}; torch.save writes a zip archive or a legacy '
            'torch pickle)')


def _unreadable(what: str, path: str, size: int,
                err: Exception) -> CheckpointError:
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    return CheckpointError(
        f'cannot read {what} {path} ({size} bytes): the file is truncated '
        f'or corrupt ({first_line})')
