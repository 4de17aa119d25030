"""MXNet RecordIO, read and written without mxnet (which no longer installs).

Layout (dmlc-core ``recordio``): each record is the little-endian uint32 magic
``0xced7230a``, a uint32 length word (upper 3 bits: continuation flag, lower
29 bits: length) and the payload padded with zeros to a multiple of 4 bytes.
A payload holding the magic at a 4-byte aligned position is split there into
parts (flag 1 = first, 2 = middle, 3 = last; 0 = whole record) and the magic
is dropped, so a reader can resynchronise on it; readers put it back.

An image record's payload is an ``IRHeader`` (uint32 flag, float32 label,
uint64 id, uint64 id2); when ``flag > 0`` it is followed by ``flag`` float32
labels (and the header's label is unused), then the encoded image. The ``.idx``
text file maps keys to byte offsets, one ``key<TAB>offset`` line per record.
"""
from __future__ import annotations

import os
import re
import struct
from collections import namedtuple
from typing import Sequence

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_WORD = struct.Struct('<II')
_LEN_MASK = (1 << 29) - 1
IR_HEADER = struct.Struct('<IfQQ')

IRHeader = namedtuple('IRHeader', ['flag', 'label', 'id', 'id2'])
_INDEX_LINE = re.compile(r'[+-]?\d+\s+[+-]?\d+')


class RecordIOError(ValueError):
    """A record that cannot be read: corrupt, truncated or index mismatch."""


def pack_record(label: float | Sequence[float], payload: bytes,
                id: int = 0, id2: int = 0) -> bytes:
    """Build an image-record payload: IRHeader (+ float32 labels) + bytes.

    A scalar ``label`` goes in the header (flag 0); a sequence of labels
    sets ``flag = len(label)`` and follows the header, as ``mx.recordio.pack``.
    """
    if np.ndim(label) == 0:
        head = IR_HEADER.pack(0, float(label), id, id2)
        return head + payload
    labels = np.asarray(label, dtype=np.float32).ravel()
    head = IR_HEADER.pack(labels.size, 0.0, id, id2)
    return head + labels.tobytes() + payload


def unpack_record(record: bytes) -> tuple[IRHeader, np.ndarray, bytes]:
    """Split an image-record payload into header, labels and image bytes.

    ``labels`` always has at least one element: the header label when
    ``flag == 0``, otherwise the ``flag`` float32 labels that follow it.
    """
    if len(record) < IR_HEADER.size:
        raise RecordIOError(f'record of {len(record)} bytes is shorter than '
                            f'the {IR_HEADER.size}-byte IRHeader')
    header = IRHeader(*IR_HEADER.unpack_from(record))
    start = IR_HEADER.size
    if header.flag == 0:
        return header, np.array([header.label], np.float32), record[start:]
    end = start + 4 * header.flag
    if end > len(record):
        raise RecordIOError(f'IRHeader flag={header.flag} announces '
                            f'{4 * header.flag} label bytes but only '
                            f'{len(record) - start} follow')
    labels = np.frombuffer(record, np.float32, header.flag, start)
    return header, labels, record[end:]


def read_index(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``.idx`` file into (keys, offsets), both int64, file order.

    Raises ``FileNotFoundError`` when the file is missing and
    :class:`RecordIOError` naming the first line that is not two integers.
    """
    if not os.path.isfile(idx_path):
        raise FileNotFoundError(f'index file {idx_path} not found: it holds '
                                'one "key<TAB>offset" line per record of '
                                'the .rec file')
    if os.path.getsize(idx_path) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    try:
        table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise _bad_index_line(idx_path, err) from err
    if table.shape[1] != 2:
        raise _bad_index_line(idx_path)
    return table[:, 0].copy(), table[:, 1].copy()


def _bad_index_line(idx_path: str,
                    err: Exception | None = None) -> RecordIOError:
    """The error for the first line of ``idx_path`` that is not
    ``key<TAB>offset``; the file is scanned in Python only once numpy's fast
    parser has failed, whose message gives no line content."""
    with open(idx_path, errors='replace') as f:
        for number, line in enumerate(f, 1):
            text = line.split('#')[0].strip()
            if text and not _INDEX_LINE.fullmatch(text):
                return RecordIOError(
                    f'{idx_path}, line {number}: {line.rstrip()!r} is not '
                    '"key<TAB>offset" (two integers)')
    return RecordIOError(f'{idx_path}: not "key<TAB>offset" lines ({err})')


class IndexedRecordReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    Safe to fork and to pickle into DataLoader workers: the index arrays are
    shared, and the file descriptor is opened lazily in each process (a
    descriptor inherited through ``fork`` would be shared with the parent).
    """

    def __init__(self, rec_path: str, idx_path: str | None = None) -> None:
        self.rec_path = rec_path
        self.idx_path = idx_path or os.path.splitext(rec_path)[0] + '.idx'
        if not os.path.isfile(rec_path):
            raise FileNotFoundError(f'RecordIO file {rec_path} not found')
        keys, offsets = read_index(self.idx_path)
        self._size = os.path.getsize(rec_path)
        self._check_offsets(keys, offsets)
        order = np.argsort(keys, kind='stable')
        self.keys, self._offsets = keys[order], offsets[order]
        if len(self.keys) and np.any(np.diff(self.keys) == 0):
            dup = self.keys[:-1][np.diff(self.keys) == 0][0]
            raise RecordIOError(f'{self.idx_path}: key {dup} appears twice')
        # Shortcuts for the usual file (keys 0..N-1 or 1..N, records in key
        # order): a key's position is key - first key, and a record ends
        # where the next key's begins, so one pread reads it whole.
        n = len(self.keys)
        self._dense = bool(n and self.keys[-1] - self.keys[0] == n - 1)
        self._in_order = bool(n and np.all(np.diff(self._offsets) > 0))
        self._fd, self._pid = None, None

    def _check_offsets(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        """Refuse offsets where no record header fits, now rather than as an
        ``OSError`` (negative) or a "truncated" record (past the end) at
        the first read of that key, possibly hours into training."""
        size = self._size
        bad = np.flatnonzero((offsets < 0) | (offsets > size - _WORD.size))
        if len(bad):
            more = f' (and {len(bad) - 1} more keys)' if len(bad) > 1 else ''
            raise RecordIOError(
                f'{self.idx_path}: key {keys[bad[0]]} has offset '
                f'{offsets[bad[0]]}, outside {self.rec_path} ({size} '
                f'bytes){more}: the .idx does not belong to this .rec, or '
                'the .rec is truncated')

    @property
    def fd(self) -> int:
        """This process's descriptor of the ``.rec`` file."""
        if self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _fd=None, _pid=None)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: int) -> bool:
        try:
            self._position(key)
        except KeyError:
            return False
        return True

    def _position(self, key: int) -> int:
        """Index of ``key`` in ``self.keys``; ``KeyError`` if absent."""
        if self._dense:
            pos = key - int(self.keys[0])
            if 0 <= pos < len(self.keys):
                return pos
        else:
            pos = int(np.searchsorted(self.keys, key))
            if pos < len(self.keys) and self.keys[pos] == key:
                return pos
        raise KeyError(f'key {key} is not in {self.idx_path}')

    def offset(self, key: int) -> int:
        return int(self._offsets[self._position(key)])

    def read(self, key: int) -> bytes:
        """The payload of record ``key`` with continuation parts joined."""
        pos = self._position(key)
        start = int(self._offsets[pos])
        if self._in_order:  # one pread up to the next record
            end = int(self._offsets[pos + 1]) if pos + 1 < len(self.keys) \
                else self._size
            data = os.pread(self.fd, end - start, start)
            if len(data) >= _WORD.size:
                magic, lrec = _WORD.unpack_from(data)
                length = lrec & _LEN_MASK
                if magic == MAGIC and lrec >> 29 == 0 and \
                        _WORD.size + length <= len(data):
                    return data[_WORD.size:_WORD.size + length]
        return self._read_parts(key, start)

    def _read_parts(self, key: int, pos: int) -> bytes:
        """Record ``key`` at offset ``pos``, header by header: joins
        continuation parts and names what is wrong with a bad record."""
        parts = []
        while True:
            word = os.pread(self.fd, _WORD.size, pos)
            if len(word) < _WORD.size:
                raise self._error(key, pos, f'file ends {len(word)} bytes '
                                  'into the record header (truncated?)')
            magic, lrec = _WORD.unpack(word)
            if magic != MAGIC:
                raise self._error(key, pos, f'magic 0x{magic:08x} != '
                                  f'0x{MAGIC:08x} (corrupt, or .idx does not '
                                  'match .rec)')
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = os.pread(self.fd, length, pos + _WORD.size)
            if len(data) < length:
                raise self._error(key, pos, f'record announces {length} bytes '
                                  f'but the file holds {len(data)} '
                                  '(truncated?)')
            parts.append(data)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)
            if cflag == 1 and len(parts) > 1 or cflag == 2 and len(parts) == 1:
                raise self._error(key, pos, f'continuation flag {cflag} out '
                                  'of order')
            pos += _WORD.size + ((length + 3) & ~3)

    def read_item(self, key: int) -> tuple[IRHeader, np.ndarray, bytes]:
        """Record ``key`` unpacked into (header, labels, image bytes)."""
        try:
            return unpack_record(self.read(key))
        except RecordIOError as err:
            if self.rec_path in str(err):
                raise
            raise RecordIOError(f'{self.rec_path}, key {key}: {err}') from err

    def _error(self, key: int, pos: int, why: str) -> RecordIOError:
        return RecordIOError(f'{self.rec_path}, key {key} (offset {pos}): '
                             f'{why}')

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, None

    def __del__(self) -> None:
        if getattr(self, '_pid', None) is not None:
            self.close()


class IndexedRecordWriter:
    """Append records to a ``.rec`` file and their offsets to the ``.idx``.

    Use as a context manager; files written here read back with mxnet's
    ``MXIndexedRecordIO`` and with :class:`IndexedRecordReader`.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None) -> None:
        self.rec_path = rec_path
        self.idx_path = idx_path or os.path.splitext(rec_path)[0] + '.idx'
        self._rec = open(rec_path, 'wb')
        self._idx = open(self.idx_path, 'w')

    def write(self, key: int, payload: bytes) -> None:
        if len(payload) > _LEN_MASK:
            raise RecordIOError(f'record {key} has {len(payload)} bytes; '
                                f'RecordIO allows at most {_LEN_MASK}')
        self._idx.write(f'{int(key)}\t{self._rec.tell()}\n')
        # split where the magic sits at an aligned position (dmlc layout)
        cuts, i = [], payload.find(_MAGIC_BYTES)
        while i >= 0:
            if i % 4 == 0:
                cuts.append(i)
            i = payload.find(_MAGIC_BYTES, i + (4 if i % 4 == 0 else 1))
        starts, ends = [0] + [c + 4 for c in cuts], cuts + [len(payload)]
        for n, (start, end) in enumerate(zip(starts, ends)):
            if not cuts:
                cflag = 0
            else:
                cflag = 1 if n == 0 else 3 if n == len(cuts) else 2
            self._rec.write(_WORD.pack(MAGIC, cflag << 29 | (end - start)))
            self._rec.write(payload[start:end])
        self._rec.write(b'\0' * (-len(payload) % 4))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> 'IndexedRecordWriter':
        return self

    def __exit__(self, *exc) -> None:
        self.close()
