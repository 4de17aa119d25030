"""The lean training pipeline (LoadImageFromBytes, RandomFlipInPlace,
face_collate) against mmpretrain's (RandomFlip, PackInputs, pseudo_collate):
same images, labels, order and flips; the preprocessor's label-tensor form;
several workers on one record file."""
import copy
import itertools

import cv2
import mmcv
import numpy as np
import pytest
import torch
from helpers import ROOT
from messages import assert_in_order, assert_mentions
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner import Runner

from mmpfc.benchmark.data_speed import train_loader_config
from mmpfc.benchmark.synthetic_faces import write_synthetic_faces
from mmpfc.datasets import MXFaceDataset, RandomFlipInPlace, face_collate
from mmpfc.datasets.encoded_batch import encoded_face_collate
from mmpfc.datasets.transforms.loading import decode_image
from mmpfc.registry import MODELS, TRANSFORMS

LEAN = dict(pipeline=[dict(type='LoadImageFromBytes'),
                      dict(type='RandomFlipInPlace', prob=0.5)],
            collate_fn=dict(type='mmpfc.face_collate'))
#: The bytes travel; the model's preprocessor decodes and flips.
ENCODED = dict(pipeline=[dict(type='RandomFlipInPlace', prob=0.5)],
               collate_fn=dict(type='mmpfc.encoded_face_collate'))
FULL = dict(pipeline=[dict(type='LoadImageFromBytes'),
                      dict(type='mmpretrain.RandomFlip', prob=0.5,
                           direction='horizontal'),
                      dict(type='mmpretrain.PackInputs')],
            collate_fn=dict(type='pseudo_collate'))


@pytest.fixture(scope='module')
def rec(tmp_path_factory):
    """A 48-image synthetic set of 6 identities (32x32 JPEGs)."""
    root = str(tmp_path_factory.mktemp('rec'))
    write_synthetic_faces(root, num_images=48, num_classes=6, size=32)
    return root


def loader(root, kind, num_workers=0, seed=7, batch_size=8):
    init_default_scope('mmpfc')
    cfg = dict(batch_size=batch_size, num_workers=num_workers,
               persistent_workers=False,
               sampler=dict(type='InfiniteSampler', shuffle=True),
               collate_fn=copy.deepcopy(kind['collate_fn']),
               dataset=dict(type='MXFaceDataset', data_root=root,
                            pipeline=copy.deepcopy(kind['pipeline'])))
    return Runner.build_dataloader(cfg, seed=seed)


def take(data_loader, n):
    it = iter(data_loader)
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ flip
@pytest.mark.parametrize('prob', [0.5, 0.3, 0.0, 1.0])
def test_flip_draws_as_mmpretrain_random_flip(prob):
    full = TRANSFORMS.build(dict(type='mmpretrain.RandomFlip', prob=prob,
                                 direction='horizontal'))
    lean = RandomFlipInPlace(prob=prob)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 6, 3), np.uint8) for _ in range(300)]
    np.random.seed(3)
    want = [full(dict(img=img.copy())) for img in images]
    np.random.seed(3)
    got = [lean(dict(img=img.copy())) for img in images]
    flips = [w['flip'] for w in want]
    assert [g['flip'] for g in got] == flips
    assert [g['flip_direction'] for g in got] == [
        w['flip_direction'] for w in want]
    for image, g, flipped in zip(images, got, flips):
        assert np.array_equal(g['img'], image[:, ::-1] if flipped else image)
    if 0 < prob < 1:
        assert abs(np.mean(flips) - prob) < 0.1


def test_flip_writes_into_the_image_and_copies_a_read_only_one():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    expected = img[:, ::-1].copy()
    flip = RandomFlipInPlace(prob=1.0)
    out = flip(dict(img=img))['img']
    assert out is img and np.array_equal(img, expected)
    frozen = expected.copy()
    frozen.flags.writeable = False
    out = flip(dict(img=frozen))['img']
    assert out is not frozen and np.array_equal(out, expected[:, ::-1])
    view = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)[:, ::2]
    assert np.array_equal(flip(dict(img=view))['img'], view[:, ::-1])
    encoded = flip(dict(img_bytes=b'jpeg'))  # decoded later: flags only
    assert encoded == dict(img_bytes=b'jpeg', flip=True,
                           flip_direction='horizontal')


# ---------------------------------------------------- decode and collate
@pytest.mark.parametrize('ext', ['.jpg', '.png'])
@pytest.mark.parametrize('order', ['rgb', 'bgr'])
def test_decode_matches_mmcv(ext, order):
    img = np.random.default_rng(1).integers(0, 256, (9, 7, 3), np.uint8)
    data = cv2.imencode(ext, img)[1].tobytes()
    want = mmcv.imfrombytes(data, flag='color', channel_order=order)
    got = decode_image(data, 'x', channel_order=order)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(got, bgr[..., ::-1] if order == 'rgb' else bgr)


@pytest.mark.parametrize('shape, dtype', [((6, 5, 3), np.uint8),
                                          ((6, 5, 3), np.float32),
                                          ((6, 5), np.uint8),
                                          ((6, 5, 4), np.uint8),
                                          ((6, 5, 3), np.int64)])
def test_collate_packs_like_pack_inputs(shape, dtype):
    pack = TRANSFORMS.build(dict(type='mmpretrain.PackInputs'))
    rng = np.random.default_rng(2)
    images = [(rng.random(shape) * 255).astype(dtype) for _ in range(3)]
    images[1] = np.ascontiguousarray(images[1][::-1])[::-1]  # a view
    want = torch.stack([pack(dict(img=img, gt_label=0))['inputs']
                        for img in images])
    got = face_collate([dict(img=img, gt_label=label)
                        for img, label in zip(images, [4, 0, 2])])
    assert got['inputs'].dtype == want.dtype
    assert got['inputs'].is_contiguous() and torch.equal(got['inputs'], want)
    assert got['data_samples'].dtype == torch.int64
    assert got['data_samples'].tolist() == [4, 0, 2]


def test_collate_refuses_what_it_cannot_stack():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError) as err:
        face_collate([dict(img=img, gt_label=0),
                      dict(img=np.zeros((5, 4, 3), np.uint8), gt_label=1)])
    assert_in_order(err, 'sample 1', 'uint8', '(5, 4, 3)', 'sample 0',
                    '(4, 4, 3)')
    packed = TRANSFORMS.build(dict(type='mmpretrain.PackInputs'))(
        dict(img=img, gt_label=0))
    with pytest.raises(TypeError, match=r"got \['data_samples', 'inputs'\];"
                       r".*pseudo_collate"):
        face_collate([packed])


# ------------------------------------------------ same batches end to end
@pytest.mark.parametrize('num_workers', [0, 2])
def test_lean_and_full_pipelines_give_the_same_batches(rec, num_workers):
    def batches(kind):
        np.random.seed(11)  # in-process flips draw from the global state
        return take(loader(rec, kind, num_workers), 4)

    full, lean = batches(FULL), batches(LEAN)
    seen = []
    for f, g in zip(full, lean):
        assert g['inputs'].shape == (8, 3, 32, 32)
        assert g['inputs'].dtype == torch.uint8
        assert torch.equal(g['inputs'], torch.stack(f['inputs']))
        labels = [int(s.gt_label) for s in f['data_samples']]
        assert g['data_samples'].tolist() == labels
        seen += [s.flip for s in f['data_samples']]
    assert 0 < sum(seen) < len(seen)  # the flips were compared
    # the order is the sampler's, and the labels those of the records
    ds = MXFaceDataset(data_root=rec)
    sampler = loader(rec, LEAN).sampler  # infinite: the first 32
    order = list(itertools.islice(iter(sampler), 32))
    assert torch.cat([g['data_samples'] for g in lean]).tolist() == [
        ds.get_data_info(i)['gt_label'] for i in order]
    assert order != sorted(order)


def test_preprocessor_gives_the_model_the_same_data(rec):
    init_default_scope('mmpfc')
    pre = MODELS.build(dict(type='FaceDataPreprocessor', mean=[127.5] * 3,
                            std=[127.5] * 3))
    np.random.seed(5)
    full = pre(take(loader(rec, FULL), 1)[0], training=True)
    np.random.seed(5)
    lean = pre(take(loader(rec, LEAN), 1)[0], training=True)
    assert torch.equal(full['inputs'], lean['inputs'])
    assert [s.gt_label.tolist() for s in lean['data_samples']] == [
        s.gt_label.tolist() for s in full['data_samples']]
    head = MODELS.build(dict(type='MarginSoftmaxHead', num_classes=6,
                             in_channels=4))
    feats = (torch.randn(8, 4), )
    assert torch.equal(head.loss(feats, lean['data_samples'])['loss'],
                       head.loss(feats, full['data_samples'])['loss'])
    with pytest.raises(ValueError) as err:
        pre(dict(inputs=lean['inputs'], data_samples=torch.zeros(8)))
    assert_mentions(err, '(B,) integer class ids', 'torch.float32', '(8,)')


@pytest.mark.parametrize('num_workers', [0, 2])
def test_encoded_batches_decode_to_the_same_model_inputs(rec, num_workers):
    """Decoding on the model's device (here the CPU, with OpenCV as the
    workers would) gives the model what the lean pipeline gives it."""
    init_default_scope('mmpfc')
    pre = MODELS.build(dict(type='FaceDataPreprocessor', mean=[127.5] * 3,
                            std=[127.5] * 3))
    np.random.seed(3)
    lean = [pre(b, training=True)
            for b in take(loader(rec, LEAN, num_workers), 2)]
    np.random.seed(3)
    encoded = take(loader(rec, ENCODED, num_workers), 2)
    assert encoded[0]['inputs'].flip.any()  # flips were drawn and kept
    for got, want in zip((pre(b, training=True) for b in encoded), lean):
        assert torch.equal(got['inputs'], want['inputs'])
        assert [s.gt_label.tolist() for s in got['data_samples']] == [
            s.gt_label.tolist() for s in want['data_samples']]
    assert pre.jpeg_decoder.fallbacks == 0


class _Samples(torch.utils.data.Dataset):
    """Four decoded and still-encoded samples, built here."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        img = np.full((5, 6, 3), i, np.uint8)
        return dict(img=img, gt_label=10 + i, flip=i % 2 == 1,
                    img_bytes=bytes([i]) * (i + 1), img_source=f'key {i}')


def _decoded_only(batch):
    return face_collate([{k: s[k] for k in ('img', 'gt_label')}
                         for s in batch])


def _encoded_only(batch):
    return encoded_face_collate([{k: v for k, v in s.items() if k != 'img'}
                                 for s in batch])


@pytest.mark.parametrize('collate', [_decoded_only, _encoded_only])
def test_a_workers_batch_arrives_as_one_block_copied_out(collate):
    """Each shared block a worker sends is one more descriptor handed to the
    main process: images, labels (and lengths, flips) come in one, and the
    main process keeps a copy of it in its own memory (the worker reuses
    the block)."""
    batch = next(iter(torch.utils.data.DataLoader(
        _Samples(), batch_size=4, num_workers=1, collate_fn=collate)))
    inputs = batch['inputs']
    tensors = ([inputs] if torch.is_tensor(inputs) else
               [inputs.data, inputs.lengths, inputs.flip])
    tensors.append(batch['data_samples'])
    assert not any(t.is_shared() for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert batch['data_samples'].tolist() == [10, 11, 12, 13]
    if torch.is_tensor(inputs):
        assert inputs.shape == (4, 3, 5, 6)
        assert [int(inputs[i].unique()) for i in range(4)] == [0, 1, 2, 3]
    else:
        assert inputs.lengths.tolist() == [1, 2, 3, 4]
        assert inputs.flip.tolist() == [False, True, False, True]
        assert [bytes(b.numpy()) for b in inputs.images()] == [
            bytes([i]) * (i + 1) for i in range(4)]


# ---------------------------------------------------- concurrent workers
def test_four_workers_read_one_file_as_one_process(rec):
    init_default_scope('mmpfc')
    ds = MXFaceDataset(data_root=rec,
                       pipeline=[dict(type='LoadImageFromBytes')])
    ds.get_data_info(0)  # the parent holds an open descriptor when forking

    def read(num_workers):
        data = torch.utils.data.DataLoader(
            ds, batch_size=3, num_workers=num_workers,
            collate_fn=face_collate)
        batches = list(data)
        return (torch.cat([b['inputs'] for b in batches]),
                torch.cat([b['data_samples'] for b in batches]))

    one, four = read(0), read(4)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])
    assert one[1].tolist() == [i // 8 for i in range(48)]  # 8 a label
    first = cv2.imdecode(np.frombuffer(ds.get_data_info(0)['img_bytes'],
                                       np.uint8), cv2.IMREAD_COLOR)
    assert torch.equal(four[0][0], torch.from_numpy(
        first[..., ::-1].transpose(2, 0, 1).copy()))


def test_ms1mv3_config_defaults_to_the_lean_pipeline(rec):
    cfg = Config.fromfile(f'{ROOT}/configs/_base_/datasets/ms1mv3.py')
    loader_cfg = train_loader_config(cfg)
    loader_cfg.dataset.update(data_root=rec, num_classes=None)
    loader_cfg.update(num_workers=0, persistent_workers=False, batch_size=4)
    init_default_scope('mmpfc')
    batch = take(Runner.build_dataloader(loader_cfg, seed=0), 1)[0]
    assert batch['inputs'].shape == (4, 3, 32, 32)
    assert batch['inputs'].dtype == torch.uint8
    assert batch['data_samples'].dtype == torch.int64
