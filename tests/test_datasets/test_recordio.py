"""RecordIO layout, round trips and error messages (no mxnet involved)."""
import os
import struct

import numpy as np
import pytest
from messages import assert_mentions

from mmpfc.datasets.recordio import (MAGIC, IndexedRecordReader,
                                     IndexedRecordWriter, RecordIOError,
                                     pack_record, read_index, unpack_record)

MAGIC_BYTES = struct.pack('<I', MAGIC)


def write(tmp_path, records: dict):
    rec = str(tmp_path / 'x.rec')
    with IndexedRecordWriter(rec) as writer:
        for key, payload in records.items():
            writer.write(key, payload)
    return rec


def test_pack_unpack_scalar_and_vector_labels():
    header, labels, img = unpack_record(pack_record(7, b'jpeg', id=3))
    assert (header.flag, header.id, img) == (0, 3, b'jpeg')
    assert labels.tolist() == [7.0]
    header, labels, img = unpack_record(pack_record([5, 9.5], b''))
    assert header.flag == 2 and img == b''
    assert labels.tolist() == [5.0, 9.5]


def test_byte_layout_matches_spec(tmp_path):
    payload = pack_record(1, b'abcde')  # 24 + 5 bytes -> 3 bytes of padding
    rec = write(tmp_path, {0: payload})
    raw = open(rec, 'rb').read()
    magic, lrec = struct.unpack('<II', raw[:8])
    assert magic == 0xced7230a and lrec >> 29 == 0 and lrec == 29
    assert raw[8:8 + 29] == payload and raw[37:] == b'\0\0\0'
    flag, label, id1, id2 = struct.unpack('<IfQQ', payload[:24])
    assert (flag, label, id1, id2) == (0, 1.0, 0, 0)
    assert open(rec[:-4] + '.idx').read() == '0\t0\n'


def test_round_trip_is_byte_exact_with_embedded_magic(tmp_path):
    rng = np.random.default_rng(0)
    records = {}
    for key in range(30):
        body = rng.integers(0, 256, int(rng.integers(0, 50)), np.uint8)
        body = body.tobytes()
        if key % 3 == 0:  # aligned and unaligned magic inside the payload
            body = (MAGIC_BYTES + body[:4] + MAGIC_BYTES * 2 + b'x' +
                    MAGIC_BYTES)
        records[key * 7 + 2] = pack_record([key, 0.5], body)
    rec = write(tmp_path, records)
    reader = IndexedRecordReader(rec)
    assert reader.keys.tolist() == sorted(records)
    for key, payload in records.items():
        assert reader.read(key) == payload
    # an aligned magic was escaped: the first record is split into parts
    raw = open(rec, 'rb').read()
    assert struct.unpack('<I', raw[4:8])[0] >> 29 == 1


def test_corrupt_magic_names_file_and_key(tmp_path):
    rec = write(tmp_path, {0: pack_record(0, b'a' * 8),
                           1: pack_record(1, b'b' * 8)})
    offset = int(read_index(rec[:-4] + '.idx')[1][1])
    with open(rec, 'r+b') as f:
        f.seek(offset)
        f.write(b'\xff\xff\xff\xff')
    reader = IndexedRecordReader(rec)
    assert reader.read_item(0)[2] == b'a' * 8
    with pytest.raises(RecordIOError, match=r'x\.rec, key 1 .*magic'):
        reader.read_item(1)


def test_truncated_file_names_file_and_key(tmp_path):
    rec = write(tmp_path, {0: pack_record(0, b'a' * 8),
                           5: pack_record(1, b'b' * 100)})
    os.truncate(rec, os.path.getsize(rec) - 50)
    with pytest.raises(RecordIOError, match=r'x\.rec, key 5 .*truncated'):
        IndexedRecordReader(rec).read(5)


def test_short_payload_and_bad_label_count(tmp_path):
    rec = write(tmp_path, {0: b'short', 1: struct.pack('<IfQQ', 9, 0, 0, 0)})
    reader = IndexedRecordReader(rec)
    with pytest.raises(RecordIOError, match=r'key 0: .*shorter'):
        reader.read_item(0)
    with pytest.raises(RecordIOError, match=r'key 1: .*flag=9'):
        reader.read_item(1)


def test_missing_key_and_bad_index(tmp_path):
    rec = write(tmp_path, {0: pack_record(0, b'')})
    with pytest.raises(KeyError, match='key 4'):
        IndexedRecordReader(rec).read(4)
    (tmp_path / 'sparse').mkdir()
    sparse = IndexedRecordReader(write(tmp_path / 'sparse', {
        2: pack_record(0, b''), 9: pack_record(1, b'')}))
    assert [k in sparse for k in (1, 2, 3, 9, 10)] == [
        False, True, False, True, False]
    assert 0 in IndexedRecordReader(rec) and 1 not in IndexedRecordReader(rec)
    with open(rec[:-4] + '.idx', 'a') as f:
        f.write('0\t0\n')
    with pytest.raises(RecordIOError, match='key 0 appears twice'):
        IndexedRecordReader(rec)


def read_in_child(reader, key, queue):
    """A forked child's descriptor of the reader and its read of ``key``."""
    queue.put((reader.fd, reader.read(key)))


def test_reader_reopens_after_pickle_and_fork(tmp_path):
    import multiprocessing
    import pickle
    rec = write(tmp_path, {0: pack_record(0, b'abc')})
    reader = IndexedRecordReader(rec)
    payload = reader.read(0)
    parent_fd = reader.fd  # open when the copies are made
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(0) == payload and clone.fd != parent_fd  # its own
    # a forked child inherits the parent's descriptor (and its offset):
    # it must open and read through one of its own
    fork = multiprocessing.get_context('fork')
    queue = fork.Queue()
    child = fork.Process(target=read_in_child, args=(reader, 0, queue))
    child.start()
    child_fd, data = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert child_fd != parent_fd and data == payload
    assert reader.fd == parent_fd and reader.read(0) == payload


def test_missing_index_names_it(tmp_path):
    rec = write(tmp_path, {0: pack_record(0, b'')})
    os.remove(rec[:-4] + '.idx')
    with pytest.raises(FileNotFoundError) as err:
        IndexedRecordReader(rec)
    assert_mentions(err, rec[:-4] + '.idx', 'not found', '"key<TAB>offset"')


@pytest.mark.parametrize('line', ['abc', '7', '7\t8\t9', '7\t1.5'])
def test_index_line_that_is_not_key_offset_is_named(tmp_path, line):
    rec = write(tmp_path, {0: pack_record(0, b'')})
    with open(rec[:-4] + '.idx', 'a') as f:
        f.write(f'\n{line}\n')  # line 2 blank, line 3 bad
    with pytest.raises(RecordIOError) as err:
        IndexedRecordReader(rec)
    assert_mentions(err, rec[:-4] + '.idx, line 3', repr(line),
                    '"key<TAB>offset"')


@pytest.mark.parametrize('offset', [-8, 36, 10**6])
def test_offset_outside_the_record_file_is_refused_at_open(tmp_path, offset):
    rec = write(tmp_path, {0: pack_record(0, b'abcd')})  # 36 bytes
    with open(rec[:-4] + '.idx', 'a') as f:
        f.write(f'5\t{offset}\n')
    with pytest.raises(RecordIOError) as err:
        IndexedRecordReader(rec)
    assert_mentions(err, rec[:-4] + '.idx', 'key 5', f'offset {offset}',
                    f'{rec} (36 bytes)')


def counted_preads(monkeypatch) -> list:
    """``os.pread`` calls from now on (restored after the test)."""
    calls, pread = [], os.pread

    def counted(fd, length, offset):
        calls.append((length, offset))
        return pread(fd, length, offset)

    monkeypatch.setattr(os, 'pread', counted)
    return calls


def test_one_read_per_record_agrees_with_the_header_walk(tmp_path,
                                                         monkeypatch):
    """Dense keys in file order are read with one pread up to the next
    record; any other index takes the header-by-header path (a pread for
    the header, one for the payload, per part). Both give the bytes
    written."""
    records = {k: pack_record(k, bytes([k]) * (k * 7 % 23)) for k in range(8)}
    # 45 bytes, then a magic at an aligned offset: split into 2 parts
    records[3] += b'pad' + MAGIC_BYTES + b'tail'
    rec = write(tmp_path, records)
    reader = IndexedRecordReader(rec)
    preads = counted_preads(monkeypatch)
    for key, payload in records.items():
        preads.clear()
        assert reader.read(key) == payload
        # record 3: the one read sees a first part, then the header walk
        assert len(preads) == (1 + 2 * 2 if key == 3 else 1), (key, preads)
    idx = rec[:-4] + '.idx'
    lines = open(idx).read().splitlines()
    with open(idx, 'w') as f:  # keys reversed, record 3 left out
        f.write('\n'.join(f'{7 - int(k)}\t{o}' for k, o in
                          (line.split('\t') for line in lines)
                          if k != '3') + '\n')
    other = IndexedRecordReader(rec)
    for key, payload in records.items():
        if key != 3:
            preads.clear()
            assert other.read(7 - key) == payload
            assert len(preads) == 2, (key, preads)  # header, payload


def test_face_writer_layout_and_identity_ranges(tmp_path):
    """insightface's layout: key 0 announces (N + 1, N + 1 + C), images at
    1..N, then one record per identity with its key range [first, last + 1);
    an identity whose images are not one after the other is refused (its
    one range could not hold them)."""
    from mmpfc.datasets.face_record_writer import FaceRecordWriter
    from mmpfc.datasets.recordio import unpack_record
    rec = str(tmp_path / 'train.rec')
    with FaceRecordWriter(rec, num_images=5, num_classes=2) as writer:
        for label in (0, 0, 0, 1, 1):
            writer.add(b'jpeg%d' % label, label)
    reader = IndexedRecordReader(rec)
    assert reader.keys.tolist() == list(range(8))
    assert unpack_record(reader.read(0))[1].tolist() == [6, 8]
    assert unpack_record(reader.read(6))[1].tolist() == [1, 4]
    assert unpack_record(reader.read(7))[1].tolist() == [4, 6]
    assert unpack_record(reader.read(4))[2] == b'jpeg1'
    with pytest.raises(ValueError) as err:
        with FaceRecordWriter(str(tmp_path / 'bad.rec'), num_images=3,
                              num_classes=2) as writer:
            for label in (0, 1, 0):
                writer.add(b'x', label)
    assert_mentions(err, 'bad.rec', 'image 3', 'label 0', 'ended at 1')
