"""evaluate_pairs, FaceVerificationDataset and FaceVerificationMetric."""
import os
import pickle

import numpy as np
import pytest
import torch
from face_files import converter, make_faces
from messages import assert_mentions
from mmengine.registry import init_default_scope

from mmpfc.datasets import FaceVerificationDataset, load_pairs_bin
from mmpfc.evaluation import (FaceVerificationMetric, evaluate_pairs,
                              l2_normalize)


def reference_accuracy(emb1, emb2, issame, folds=10):
    """Plain-loop version of the protocol, written independently."""
    dist = [sum((a - b)**2) for a, b in zip(emb1, emb2)]
    n, thresholds = len(dist), [i / 100 for i in range(400)]
    sizes = [n // folds + (1 if k < n % folds else 0) for k in range(folds)]
    accs, start = [], 0
    for size in sizes:
        test = set(range(start, start + size))
        start += size

        def acc(t, rows):
            return sum((dist[i] < t) == issame[i] for i in rows) / len(rows)

        train = [i for i in range(n) if i not in test]
        best = max(thresholds, key=lambda t: (acc(t, train), -t))
        accs.append(acc(best, sorted(test)))
    mean = sum(accs) / folds
    return mean, (sum((a - mean)**2 for a in accs) / folds)**0.5


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_evaluate_pairs_matches_reference():
    rng = np.random.default_rng(3)
    emb1 = unit(rng.normal(size=(53, 8)))
    issame = rng.random(53) < 0.5
    noise = np.where(issame[:, None], 0.6, 3.0)
    emb2 = unit(emb1 + noise * rng.normal(size=(53, 8)))
    out = evaluate_pairs(emb1, emb2, issame)
    mean, std = reference_accuracy(emb1, emb2, issame)
    assert 0.6 < mean < 1.0
    assert out['accuracy'] == pytest.approx(mean, abs=1e-12)
    assert out['accuracy_std'] == pytest.approx(std, abs=1e-12)
    assert len(out['fold_accuracy']) == 10 and 0 < out['threshold'] < 4


def test_evaluate_pairs_known_answers():
    rng = np.random.default_rng(0)
    emb1 = unit(rng.normal(size=(40, 4)))
    other = unit(rng.normal(size=(40, 4)))
    issame = np.arange(40) % 2 == 0
    # genuine pairs identical (distance 0), impostors far: separable
    emb2 = np.where(issame[:, None], emb1, -emb1)
    out = evaluate_pairs(emb1, emb2, issame)
    assert out['accuracy'] == 1.0 and out['accuracy_std'] == 0.0
    # threshold 0.01 is the first that accepts distance 0
    assert out['threshold'] == pytest.approx(0.01)
    # labels flipped: no threshold can beat guessing "different" for all
    out = evaluate_pairs(emb1, emb2, ~issame, nrof_folds=1)
    assert out['accuracy'] == 0.5 and out['threshold'] == 0.0
    with pytest.raises(ValueError, match='nrof_folds=50'):
        evaluate_pairs(emb1, other, issame, nrof_folds=50)


@pytest.fixture(scope='module')
def bins(tmp_path_factory):
    """Two .bin sets written with pairs2bin from 12x12 images."""
    root = tmp_path_factory.mktemp('verif')
    files = list(make_faces(str(root), counts=(4, 4, 4), seed=1))
    pairs2bin = converter('pairs2bin')
    paths = {}
    for name, count in (('lfw', 10), ('agedb_30', 6)):
        lines = [f'{os.path.relpath(files[(2 * p) % 12], root)} '
                 f'{os.path.relpath(files[(2 * p + 1 + p) % 12], root)} '
                 f'{p % 2}' for p in range(count)]
        (root / f'{name}.txt').write_text('\n'.join(lines) + '\n')
        paths[name] = str(root / f'{name}.bin')
        pairs2bin.main([str(root / f'{name}.txt'), paths[name],
                        '--root', str(root)])
    return paths, files


def test_bin_round_trip_and_dataset(bins):
    paths, files = bins
    images, issame = load_pairs_bin(paths['lfw'])
    assert len(images) == 20 and issame == [p % 2 == 1 for p in range(10)]
    assert images[1] == open(files[1], 'rb').read()
    init_default_scope('mmpfc')
    ds = FaceVerificationDataset(ann_file=paths['lfw'])
    assert len(ds) == 40
    a, b = ds[6], ds[7]  # image 3, as is and mirrored
    assert a['data_samples'].image_idx == b['data_samples'].image_idx == 3
    assert (a['data_samples'].flip, b['data_samples'].flip) == (False, True)
    assert a['data_samples'].is_same
    assert a['data_samples'].dataset_name == 'lfw'
    assert torch.equal(a['inputs'].flip(-1), b['inputs'])
    with pytest.raises(ValueError, match='FlipIfRequested'):
        FaceVerificationDataset(ann_file=paths['lfw'],
                                pipeline=[dict(type='LoadImageFromBytes')])


def fake_predictions(datasets, model):
    """Data samples as ``PartialFCHead.predict`` returns them (raw
    ``raw_feat``, normalized ``pred_feat``), shuffled."""
    samples = []
    for ds in datasets:
        for i in range(len(ds)):
            item = ds[i]
            sample = item['data_samples']
            feat = model(item['inputs'])
            sample.set_field(feat, 'raw_feat')
            sample.set_field(feat / feat.norm(), 'pred_feat')
            samples.append(sample.to_dict())
    order = np.random.default_rng(0).permutation(len(samples))
    return [samples[i] for i in order]


def test_metric_flip_sum_protocol_on_two_sets(bins):
    paths, _ = bins
    init_default_scope('mmpfc')
    sets = [FaceVerificationDataset(ann_file=p) for p in paths.values()]
    both = FaceVerificationDataset(ann_file=list(paths.values()))
    assert len(both) == 64
    weight = torch.randn(3 * 12 * 12, 5,
                         generator=torch.Generator().manual_seed(0))

    def model(x):
        return 3 * (x.float().flatten() / 255) @ weight

    metric = FaceVerificationMetric(nrof_folds=2, prefix='val')
    metric.dataset_meta = both.metainfo
    metric.process(None, fake_predictions([both], model))
    out = metric.evaluate(len(both))
    for name, ds in zip(paths, sets):  # recomputed in dataset order
        raw = np.stack([model(ds[i]['inputs']).double().numpy()
                        for i in range(len(ds))])
        emb = unit(raw[0::2] + raw[1::2])  # image + its mirror
        issame = load_pairs_bin(paths[name])[1]
        mean, std = reference_accuracy(emb[0::2], emb[1::2], issame, folds=2)
        assert out[f'val/{name}/accuracy'] == pytest.approx(mean, abs=1e-9)
        assert out[f'val/{name}/accuracy_std'] == pytest.approx(std, abs=1e-9)
        assert out[f'val/{name}/xnorm'] == pytest.approx(
            np.linalg.norm(raw, axis=1).mean(), rel=1e-5)
    assert {'val/lfw/threshold', 'val/mean_accuracy'} <= set(out)
    assert out['val/mean_accuracy'] == pytest.approx(
        (out['val/lfw/accuracy'] + out['val/agedb_30/accuracy']) / 2)


def test_metric_rejects_incomplete_or_unlabelled_samples(bins):
    paths, _ = bins
    init_default_scope('mmpfc')
    ds = FaceVerificationDataset(ann_file=paths['agedb_30'])
    samples = fake_predictions([ds], lambda x: x.float().flatten()[:4])
    metric = FaceVerificationMetric(nrof_folds=2)
    metric.process(None, samples[:-1])
    with pytest.raises(ValueError, match=r'agedb_30: got 23 embeddings'):
        metric.compute_metrics(metric.results)
    with pytest.raises(KeyError, match=r"\['dataset_name'"):
        metric.process(None, [dict(raw_feat=torch.ones(4), image_idx=0,
                                   is_same=True, flip=False)])
    with pytest.raises(KeyError) as err:
        metric.process(None, [dict(pred_feat=torch.ones(4), image_idx=0,
                                   is_same=True, flip=False,
                                   dataset_name='lfw')])
    assert_mentions(err, "['raw_feat']", 'must set')


def test_evaluate_pairs_refuses_embeddings_that_are_not_unit_length():
    rng = np.random.default_rng(3)
    emb1 = unit(rng.normal(size=(53, 8)))
    emb2 = unit(emb1 + rng.normal(size=(53, 8)))
    issame = rng.random(53) < 0.5
    expected = evaluate_pairs(emb1, emb2, issame)
    raw1 = 20 * emb1  # what a backbone outputs before normalization
    with pytest.raises(ValueError) as err:
        evaluate_pairs(raw1, emb2, issame)
    # the first bad row, its norm, how many, and the way out
    assert_mentions(err, 'emb1 row 0', 'L2 norm 20', '53 of 53 rows',
                    'l2_normalize')
    raw2 = emb2.copy()
    raw2[7] = np.nan
    with pytest.raises(ValueError) as err:
        evaluate_pairs(emb1, raw2, issame)
    assert_mentions(err, 'emb2 row 7', 'L2 norm nan', '1 of 53 rows')
    # normalized input: accepted, and the numbers of the reference
    out = evaluate_pairs(l2_normalize(raw1), emb2, issame)
    mean, std = reference_accuracy(emb1, emb2, issame)
    assert out['accuracy'] == pytest.approx(mean, abs=1e-12)
    assert out['accuracy_std'] == pytest.approx(std, abs=1e-12)
    assert out['accuracy'] == expected['accuracy']
    np.testing.assert_allclose(out['fold_threshold'],
                               expected['fold_threshold'])
    emb2[3] = 0  # a zero embedding, as l2_normalize leaves it, is accepted
    evaluate_pairs(emb1, emb2, issame)


def write_bin(path, content) -> str:
    with open(path, 'wb') as f:
        pickle.dump(content, f, protocol=4)
    return str(path)


def png(value=0) -> bytes:
    import cv2
    img = np.full((4, 4, 3), value, np.uint8)
    return cv2.imencode('.png', img)[1].tobytes()


#: what the messages say a pairs file holds
LAYOUT = ('2P encoded images', 'P is-same bools')


@pytest.mark.parametrize('content, named', [
    (([png()] * 2, [True], 'extra'),
     ('lfw.bin:', 'type tuple', '(length 3)') + LAYOUT),
    ({'images': []}, ('lfw.bin:', 'type dict') + LAYOUT),
    ((b'png', [True]), ('lfw.bin:', 'images', 'type bytes') + LAYOUT),
    (([png()] * 3, [True]), ('lfw.bin:', '3 images for 1 pairs') + LAYOUT),
    (([], []), ('lfw.bin:', '0 images for 0 pairs')),
    (([png(), 5], [True]),
     ('lfw.bin, image 1', 'type int', '(5)', 'bytes or a 1-D uint8 array')),
    (([png(), 'png'], [True]), ('lfw.bin, image 1', 'type str')),
    (([png(), np.zeros((4, 4, 3), np.uint8)], [True]),
     ('lfw.bin, image 1', 'shape (4, 4, 3)', 'dtype uint8')),
])
def test_bin_of_another_layout_names_file_and_layout(tmp_path, content,
                                                     named):
    path = write_bin(tmp_path / 'lfw.bin', content)
    with pytest.raises(ValueError) as err:
        load_pairs_bin(path)
    assert_mentions(err, str(tmp_path), *named)


@pytest.mark.parametrize('cut', [0, 10, -3])
def test_truncated_bin_names_file(tmp_path, cut):
    path = write_bin(tmp_path / 'lfw.bin', ([png()] * 4, [True, False]))
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:cut])
    with pytest.raises(ValueError) as err:
        load_pairs_bin(path)
    assert_mentions(err, f'{path}:', 'cannot unpickle', *LAYOUT)


@pytest.mark.parametrize('flag', ['False', 'True', 2, -1, None, 0.0])
def test_issame_flags_must_be_bools(tmp_path, flag):
    path = write_bin(tmp_path / 'lfw.bin', ([png()] * 4, [True, flag]))
    with pytest.raises(ValueError) as err:
        load_pairs_bin(path)
    assert_mentions(err, f'{path}, pair 1', f'{flag!r} '
                    f'({type(flag).__name__})', 'bool', '0/1')


def test_issame_accepts_bools_numpy_bools_and_01(tmp_path):
    flags = [True, np.bool_(False), 0, np.int64(1)]
    path = write_bin(tmp_path / 'lfw.bin', ([png()] * 8, flags))
    images, issame = load_pairs_bin(path)
    assert issame == [True, False, False, True]
    assert all(type(s) is bool for s in issame)
    path = write_bin(tmp_path / 'lfw.bin',
                     ([np.frombuffer(png(), np.uint8)] * 2,
                      np.array([True])))
    assert load_pairs_bin(path) == ([png()] * 2, [True])


def test_undecodable_bin_image_names_file_and_index(tmp_path):
    path = write_bin(tmp_path / 'lfw.bin', ([png(), png(), png(), b'junk'],
                                            [True, False]))
    init_default_scope('mmpfc')
    ds = FaceVerificationDataset(ann_file=path)
    assert ds[5]['inputs'].shape == (3, 4, 4)  # image 2, mirrored
    with pytest.raises(ValueError) as err:
        ds[6]
    assert_mentions(err, f'{path}, image 3', 'cannot decode', '4 bytes',
                    "b'junk'")


def test_metric_names_a_non_finite_embedding(bins):
    paths, _ = bins
    init_default_scope('mmpfc')
    ds = FaceVerificationDataset(ann_file=paths['agedb_30'])
    samples = fake_predictions([ds], lambda x: x.float().flatten()[:4])
    for sample in samples:
        if sample['image_idx'] == 3 and sample['flip']:
            sample['raw_feat'] = torch.full((4, ), float('nan'))
    metric = FaceVerificationMetric(nrof_folds=2)
    metric.process(None, samples)
    with pytest.raises(ValueError) as err:
        metric.compute_metrics(metric.results)
    assert_mentions(err, 'agedb_30', 'image 3 (mirrored)', 'not finite',
                    '1 of 24 embeddings')


def polar(norm, degrees):
    angle = np.deg2rad(degrees)
    return norm * np.array([np.cos(angle), np.sin(angle)])


def test_metric_flip_sums_raw_embeddings_by_default():
    """insightface sums the raw embeddings of image and mirror, then
    normalizes; summing normalized ones weights a norm-1 mirror as much as
    a norm-10 image. Here the two sums disagree on every pair: raw sums
    make genuine pairs 11.4 degrees apart and impostors 78.6, normalized
    sums put genuines 90 degrees apart and impostors on one another."""
    genuine = [(polar(10, 0), polar(1, 90)), (polar(10, 0), polar(1, -90))]
    impostor = [(polar(10, 0), polar(1, 90)), (polar(1, 0), polar(10, 90))]
    pairs = [(genuine, True), (impostor, False)] * 2  # 2 of each per fold
    samples, raw = [], np.zeros((2, 8, 2))  # (flip, image, dim)
    for p, (images, same) in enumerate(pairs):
        for k, views in enumerate(images):
            for flip, feat in enumerate(views):
                raw[flip, 2 * p + k] = feat
                samples.append(dict(
                    dataset_name='lfw', image_idx=2 * p + k, flip=bool(flip),
                    is_same=same, raw_feat=torch.tensor(feat),
                    pred_feat=torch.tensor(feat / np.linalg.norm(feat))))
    issame = [same for _, same in pairs]
    by_raw = unit(raw[0] + raw[1])
    by_unit = unit(unit(raw[0]) + unit(raw[1]))
    expected, _ = reference_accuracy(by_raw[0::2], by_raw[1::2], issame, 2)
    other, _ = reference_accuracy(by_unit[0::2], by_unit[1::2], issame, 2)
    assert (expected, other) == (1.0, 0.5)  # the two sums do differ here
    metric = FaceVerificationMetric(nrof_folds=2)
    metric.process(None, samples)
    out = metric.compute_metrics(metric.results)
    assert out['lfw/accuracy'] == expected
    assert out['lfw/xnorm'] == pytest.approx(5.5)  # norms 10 and 1
    normalized = FaceVerificationMetric(nrof_folds=2, feat_key='pred_feat')
    normalized.process(None, samples)
    out = normalized.compute_metrics(normalized.results)
    assert out['lfw/accuracy'] == other
    assert out['lfw/xnorm'] == pytest.approx(1.0)
