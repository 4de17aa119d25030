"""MXFaceDataset on record files written by tools/dataset_converters."""
import os

import cv2
import numpy as np
import pytest
import torch
from face_files import converter, make_faces
from messages import assert_mentions
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope

from mmpfc.datasets import MXFaceDataset, RecordIOError, face_collate
from mmpfc.registry import DATASETS

PIPELINE = [dict(type='LoadImageFromBytes'),
            dict(type='mmpretrain.RandomFlip', prob=0.5),
            dict(type='mmpretrain.PackInputs')]
#: the lean pipeline of configs/_base_/datasets/ms1mv3.py (+ face_collate)
LEAN_PIPELINE = [dict(type='LoadImageFromBytes'),
                 dict(type='RandomFlipInPlace', prob=0.5)]


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    files = make_faces(str(root / 'faces'))
    folder2rec = converter('folder2rec')
    folder2rec.main([str(root / 'faces'), str(root / 'meta')])
    folder2rec.main([str(root / 'faces'), str(root / 'plain'), '--plain'])
    return root, list(files.values())


@pytest.mark.parametrize('layout', ['meta', 'plain'])
def test_reads_back_byte_and_label_exact(faces, layout):
    root, files = faces
    ds = MXFaceDataset(data_root=str(root / layout))
    assert len(ds) == len(files) == 9
    assert (ds.num_classes, ds.image_size) == (3, (12, 12))
    got = [(info['img_bytes'], info['gt_label'])
           for info in map(ds.get_data_info, range(len(ds)))]
    assert got == files
    assert ds.get_data_info(-1)['sample_idx'] == 8


def test_num_classes_must_match_property_and_labels(faces):
    root, _ = faces
    with pytest.raises(ValueError, match=r'num_classes=5 .* says 3'):
        MXFaceDataset(data_root=str(root / 'meta'), num_classes=5)
    ds = MXFaceDataset(data_root=str(root / 'meta'), num_classes=2,
                       property_file=None)
    assert ds.get_data_info(4)['gt_label'] == 1
    with pytest.raises(ValueError, match=r'key 6: label 2.0 .*\[0, 2\)'):
        ds.get_data_info(5)


@pytest.mark.parametrize('pipeline', [(), PIPELINE, LEAN_PIPELINE],
                         ids=['no pipeline', 'mmpretrain', 'lean'])
def test_corrupt_record_names_file_and_key(faces, tmp_path, pipeline):
    root, _ = faces
    for name in ('train.rec', 'train.idx', 'property'):
        data = open(root / 'meta' / name, 'rb').read()
        open(tmp_path / name, 'wb').write(data)
    offset = int(open(tmp_path / 'train.idx').read().split()[7])  # key 3
    with open(tmp_path / 'train.rec', 'r+b') as f:
        f.seek(offset + 3)
        f.write(b'\x00')
    ds = MXFaceDataset(data_root=str(tmp_path), pipeline=pipeline)
    assert ds.get_data_info(1)['gt_label'] == 0
    with pytest.raises(RecordIOError, match=r'train\.rec, key 3 .*magic'):
        ds.get_data_info(2)
    if pipeline:  # through the loader and its collate, as in training
        loader = torch.utils.data.DataLoader(
            ds, batch_size=3, collate_fn=face_collate
            if pipeline is LEAN_PIPELINE else pseudo_collate)
        with pytest.raises(RecordIOError, match=r'train\.rec, key 3 '
                           r'\(offset \d+\): magic'):
            list(loader)


def test_pipeline_from_registry_packs_label(faces):
    root, files = faces
    init_default_scope('mmpfc')
    ds = DATASETS.build(dict(type='MXFaceDataset', data_root=str(root),
                             ann_file='meta/train.rec',
                             property_file='meta/property',
                             pipeline=PIPELINE))
    out = ds[5]
    assert out['inputs'].shape == (3, 12, 12)
    assert out['inputs'].dtype == torch.uint8
    assert out['data_samples'].gt_label.tolist() == [files[5][1]]
    bgr = cv2.imdecode(np.frombuffer(files[5][0], np.uint8), cv2.IMREAD_COLOR)
    chw = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1)  # RGB
    assert torch.equal(out['inputs'], chw) or torch.equal(
        out['inputs'], chw.flip(-1))


def test_indices_and_subset(faces):
    root, files = faces
    ds = MXFaceDataset(data_root=str(root / 'meta'), indices=[8, 0])
    assert [ds.get_data_info(i)['img_bytes'] for i in range(2)] == [
        files[8][0], files[0][0]]
    full = MXFaceDataset(data_root=str(root / 'meta'), lazy_init=True)
    sub = full.get_subset(3)
    assert len(sub) == 3 and len(full) == 9


class _Probe(torch.utils.data.Dataset):
    """Label, pid and the reader's descriptor as a DataLoader worker sees
    them."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, idx):
        label = self.ds.get_data_info(idx)['gt_label']
        return label, os.getpid(), self.ds.reader.fd


def test_dataloader_workers_open_their_own_file(faces):
    root, files = faces
    ds = MXFaceDataset(data_root=str(root / 'meta'))
    ds.get_data_info(0)  # the parent opens the file before forking
    parent_fd = ds.reader.fd
    loader = torch.utils.data.DataLoader(_Probe(ds), batch_size=2,
                                         num_workers=2)
    rows = [row for batch in loader
            for row in zip(*(t.tolist() for t in batch))]
    assert [r[0] for r in rows] == [label for _, label in files]
    # a worker inherits the parent's descriptor but reads through its own
    assert all(pid != os.getpid() and fd != parent_fd
               for _, pid, fd in rows)
    assert len({pid for _, pid, _ in rows}) == 2


def write_rec(folder, records: dict) -> str:
    """``folder/train.rec`` (+ ``.idx``) of ``{key: (label, image bytes)}``."""
    from mmpfc.datasets import IndexedRecordWriter, pack_record
    rec = os.path.join(str(folder), 'train.rec')
    with IndexedRecordWriter(rec) as writer:
        for key, (label, payload) in records.items():
            writer.write(key, pack_record(label, payload))
    return rec


def png(size=4) -> bytes:
    img = np.zeros((size, size, 3), np.uint8)
    return cv2.imencode('.png', img)[1].tobytes()


def test_undecodable_image_names_file_and_key(tmp_path):
    write_rec(tmp_path, {0: (0, png()), 1: (1, b'garbage!!')})
    # the record, the size and first bytes of what is there
    named = (f'{tmp_path}/train.rec, key 1', 'cannot decode', '9 bytes',
             "b'garbage!'")
    ds = MXFaceDataset(data_root=str(tmp_path), pipeline=PIPELINE)
    assert ds[0]['inputs'].shape == (3, 4, 4)
    with pytest.raises(ValueError) as err:
        ds[1]
    assert_mentions(err, *named)
    lean = MXFaceDataset(data_root=str(tmp_path), pipeline=LEAN_PIPELINE)
    assert lean[0]['img'].shape == (4, 4, 3)
    with pytest.raises(ValueError) as err:
        lean[1]
    assert_mentions(err, *named)
    loader = torch.utils.data.DataLoader(lean, batch_size=2,
                                         collate_fn=face_collate)
    with pytest.raises(ValueError) as err:
        list(loader)
    assert_mentions(err, *named)
    from mmpfc.datasets import LoadImageFromBytes
    with pytest.raises(ValueError) as err:
        LoadImageFromBytes()(dict(img_bytes=b'', key=7))
    assert_mentions(err, 'sample 7', '0 bytes')  # no source given: the key


@pytest.mark.parametrize('text', ['3,112', 'a,b,c', '', '0,112,112',
                                  '3,-112,112'])
def test_property_must_be_three_positive_integers(tmp_path, text):
    write_rec(tmp_path, {0: (0, png())})
    (tmp_path / 'property').write_text(text)
    with pytest.raises(ValueError) as err:
        MXFaceDataset(data_root=str(tmp_path))
    assert_mentions(err, str(tmp_path / 'property'),
                    '"num_classes,height,width"', f'got {text!r}')


@pytest.mark.parametrize('label', [float('nan'), float('inf'), 1.5, -1, 3])
def test_label_outside_classes_names_file_and_key(tmp_path, label):
    write_rec(tmp_path, {0: (0, png()), 1: (label, png())})
    ds = MXFaceDataset(data_root=str(tmp_path), num_classes=3)
    assert ds.get_data_info(0)['gt_label'] == 0
    with pytest.raises(ValueError) as err:
        ds.get_data_info(1)
    assert_mentions(err, f'{tmp_path}/train.rec, key 1',
                    f'label {float(label)}', '[0, 3)')


@pytest.mark.parametrize('end, named', [
    (float('nan'), ('train.rec, key 0', 'meta header', 'first label nan')),
    (0, ('train.rec, key 0', 'meta header', 'first label 0.0')),
    (1, ('train.rec:', 'no image records', 'train.idx indexes 2 records')),
])
def test_meta_header_that_announces_no_images(tmp_path, end, named):
    write_rec(tmp_path, {0: ([end, 5], b''), 1: (0, png())})
    with pytest.raises(RecordIOError) as err:
        MXFaceDataset(data_root=str(tmp_path))
    assert_mentions(err, str(tmp_path), *named)
