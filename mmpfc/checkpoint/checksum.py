"""Checksums of checkpoint files: computed when they are written (read
back while ``fsync`` flushes them to disk), verified before they are read.

A checksum is a string ``'<algorithm>:<hex digest>'`` so that a later
mmpfc can change the algorithm and still read what this one wrote. The
algorithm, ``xxh3tree``, is XXH3-64 (the ``xxhash`` package) of the
concatenated 8-byte digests (big-endian, xxhash's canonical form) of the
file's consecutive 64 MiB parts, each hashed with XXH3-64. The parts let a
file be hashed on several threads with one result whatever their number.
The point is to catch a file damaged on disk or in a copy (a flipped bit, a
torn block), not one forged on purpose: a non-cryptographic hash suffices,
and XXH3 is among the fastest maintained ones (on one core of this
project's CPU machine it hashes a file at 6.4 GB/s, read included, against
3.1 for the standard library's ``zlib.crc32``).

Where each checksum is kept: a shard file's in the manifest of its main
file (``Manifest.shard_checksums``); the main file's, which cannot hold
its own, in a sidecar ``<main file>.sum`` written just after the main file
is renamed into place (:func:`mmpfc.checkpoint.io.replace_recorded`).
"""
from __future__ import annotations

import json
import os
import os.path as osp
import re
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Optional, Tuple

import xxhash

from .errors import CheckpointError

ALGORITHM = 'xxh3tree'
#: the parts hashed on their own (part of the algorithm's definition)
PART_BYTES = 64 << 20
SIDECAR_SUFFIX = '.sum'
_CHECKSUM = re.compile(r'^(?P<algorithm>[a-z0-9_]+):(?P<digest>[0-9a-f]+)$')
_CHUNK = 8 << 20
_WORKERS = max(1, min(4, os.cpu_count() or 1))


def is_checksum(value) -> bool:
    """Whether ``value`` is a checksum string (``'<algorithm>:<hex>'``)."""
    return isinstance(value, str) and bool(_CHECKSUM.match(value))


def file_checksum(path: str, workers: Optional[int] = None) -> str:
    """The checksum of the file ``path``, its parts hashed on up to
    ``workers`` threads (default: up to 4 CPUs), so verifying a shard on
    load costs a fraction of reading it."""
    parts = max(1, -(-osp.getsize(path) // PART_BYTES))
    hash_part = partial(_part_digest, path)
    if parts == 1:
        digests = [hash_part(0)]
    else:
        with ThreadPoolExecutor(min(parts, workers or _WORKERS),
                                thread_name_prefix='checksum') as pool:
            digests = list(pool.map(hash_part, range(parts)))
    return f'{ALGORITHM}:{xxhash.xxh3_64_hexdigest(b"".join(digests))}'


def _part_digest(path: str, index: int) -> bytes:
    """XXH3-64 digest of part ``index`` of ``path``, read in chunks."""
    digest = xxhash.xxh3_64()
    view = memoryview(bytearray(_CHUNK))
    left = PART_BYTES
    with open(path, 'rb', buffering=0) as f:
        f.seek(index * PART_BYTES)
        while left:
            count = f.readinto(view[:min(left, _CHUNK)])
            if not count:
                break
            digest.update(view[:count])
            left -= count
    return digest.digest()


def sync_and_checksum(path: str) -> str:
    """``fsync`` the written file ``path`` and return its checksum, read
    back (from the page cache) while the disk is being flushed."""
    with ThreadPoolExecutor(1, thread_name_prefix='checksum') as pool:
        pending = pool.submit(file_checksum, path)
        with open(path, 'rb') as f:
            os.fsync(f.fileno())
        return pending.result()


def verify_checksum(path: str, expected: str, what: str = 'checkpoint',
                    sidecar: Optional[str] = None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` has the checksum
    ``expected``, recorded when it was written: in the file ``sidecar``
    (a main file), else in the manifest (a shard file)."""
    recorded_in = sidecar or 'the manifest of its checkpoint'
    match = isinstance(expected, str) and _CHECKSUM.match(expected)
    if not match or match['algorithm'] != ALGORITHM:
        raise CheckpointError(
            f'{what} {path}: the checksum recorded in {recorded_in} is '
            f'{expected!r}; this mmpfc verifies {ALGORITHM!r} checksums '
            f"('{ALGORITHM}:<16 hex digits>')")
    found = file_checksum(path)
    if found != expected:
        on_purpose = '' if sidecar is None else (
            f' If you changed the file on purpose, delete {sidecar} to '
            'load it unchecked.')
        raise CheckpointError(
            f'{what} {path} is corrupt: its checksum is {found}, but '
            f'{expected} was recorded in {recorded_in} when it was written '
            '(damaged on disk or in a copy). Do not use this checkpoint: '
            f'resume from the previous one{_previous(path)}, or copy it '
            f'again from an intact source.{on_purpose}')


def _previous(path: str) -> str:
    """`` (--resume DIR/iter_K.pth)`` naming the newest checkpoint before
    the one ``path`` belongs to (``iter_N`` / ``epoch_N``), if any."""
    folder, name = osp.split(osp.abspath(path))
    if '.shards-' in osp.basename(folder):
        folder, name = osp.split(folder)  # a shard: its checkpoint's folder
        name = name.split('.shards-')[0]
    numbered = re.compile(r'(iter|epoch)_(\d+)\.pth')
    this = numbered.fullmatch(name)
    if this is None or not osp.isdir(folder):
        return ''
    older = sorted((int(m[2]), entry) for entry in os.listdir(folder)
                   for m in [numbered.fullmatch(entry)]
                   if m and m[1] == this[1] and int(m[2]) < int(this[2]))
    if not older:
        return ''
    return f' (--resume {osp.join(folder, older[-1][1])})'


def sidecar_path(main_path: str) -> str:
    """Where the checksum of the main file ``main_path`` is kept."""
    return main_path + SIDECAR_SUFFIX


def read_sidecar(main_path: str) -> Optional[Tuple[str, int]]:
    """``(checksum, size)`` recorded for ``main_path``; None without a
    sidecar (a checkpoint written before checksums, or by another tool)."""
    path = sidecar_path(main_path)
    try:
        with open(path) as f:
            record = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f'checksum file {path} of {main_path} cannot be read ({err}); '
            'it should hold {"file", "bytes", "checksum"} as JSON: delete '
            'it to load the checkpoint unchecked') from err
    checksum = record.get('checksum') if isinstance(record, dict) else None
    size = record.get('bytes') if isinstance(record, dict) else None
    if not isinstance(checksum, str) or not isinstance(size, int):
        raise CheckpointError(
            f'checksum file {path} of {main_path} holds {record!r}; '
            'expected {"file", "bytes", "checksum"}: delete it to load the '
            'checkpoint unchecked')
    return checksum, size


def verify_main_file(path: str, what: str = 'checkpoint') -> bool:
    """Check ``path`` against its sidecar; False when it has none."""
    recorded = read_sidecar(path)
    if recorded is None:
        return False
    checksum, size = recorded
    found = osp.getsize(path)
    if found != size:
        raise CheckpointError(
            f'{what} {path} has {found} bytes but {size} were written '
            f'(per {sidecar_path(path)}): the file is truncated or '
            f'corrupt. Resume from the previous checkpoint{_previous(path)}')
    verify_checksum(path, checksum, what, sidecar_path(path))
    return True
