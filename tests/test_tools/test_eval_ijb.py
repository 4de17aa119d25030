"""IJB protocol pieces and tools/eval_ijb.py on tiny synthetic meta files."""
import os

import cv2
import numpy as np
import pytest
import torch
from embedding_models import (NECK_MODEL, fresh_neck, neck_by_hand,
                              save_neck_checkpoint, unit_rows)
from helpers import load_tool
from messages import assert_in_order, assert_mentions
from mmengine.config import Config

from mmpfc.evaluation.functional.ijb import (ARCFACE_LANDMARKS, align_face,
                                             pair_scores, roc_curve,
                                             similarity_transform, tar_at_far,
                                             template_features)


def load_eval_ijb():
    return load_tool('eval_ijb.py')


def similarity(angle, scale, shift):
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_similarity_transform_recovers_a_known_one():
    matrix = similarity(0.3, 1.7, (12.0, -5.0))
    found = similarity_transform(ARCFACE_LANDMARKS,
                                 apply(matrix, ARCFACE_LANDMARKS))
    np.testing.assert_allclose(found, matrix, atol=1e-9)


def test_align_face_undoes_the_crop_geometry():
    face = cv2.GaussianBlur(np.random.default_rng(0).integers(
        0, 256, (112, 112, 3), np.uint8), (0, 0), 2)
    matrix = similarity(-0.2, 1.5, (30.0, 40.0))  # template -> loose crop
    crop = cv2.warpAffine(face, matrix, (250, 250))
    aligned = align_face(crop, apply(matrix, ARCFACE_LANDMARKS))
    diff = np.abs(aligned.astype(int) - face)[20:92, 20:92]
    assert diff.mean() < 2


def test_templates_average_media_then_sum():
    feats = np.array([[1., 0], [3, 0], [0, 2], [1, 1], [5, 5]])
    ids, tfeats = template_features(feats, np.array([7, 7, 7, 9, 9]),
                                    np.array([1, 1, 2, 3, 3]))
    assert ids.tolist() == [7, 9]
    # template 7: mean of the two media-1 images (2, 0) + media 2 (0, 2)
    np.testing.assert_allclose(tfeats, [[2**-.5, 2**-.5], [2**-.5, 2**-.5]])
    scores = pair_scores(ids, tfeats, np.array([[7, 9], [9, 9]]))
    np.testing.assert_allclose(scores, [1.0, 1.0])
    with pytest.raises(ValueError) as err:
        pair_scores(ids, tfeats, np.array([[7, 8]]))
    assert_mentions(err, 'pair 0 [7, 8]', 'template without images')


def test_roc_and_tar_at_far_on_known_scores():
    # 4 genuine pairs, 10 impostors; one impostor outscores two genuines
    labels = np.array([1, 1, 1, 1] + [0] * 10, bool)
    scores = np.array([.9, .8, .4, .3, .5] + [.1] * 9)
    fpr, tpr, thr = roc_curve(labels, scores)
    assert fpr.tolist() == [0, 0, 0, .1, .1, .1, 1]
    assert tpr.tolist() == [0, .25, .5, .5, .75, 1, 1]
    assert thr[1:].tolist() == [.9, .8, .5, .4, .3, .1]
    assert tar_at_far(labels, scores, fars=(1e-3, .1, .5)) == {
        1e-3: .5, .1: 1.0, .5: 1.0}


def write_ijb(root, rng):
    """3 images in 3 templates, 3 pairs; loose crops with landmarks."""
    os.makedirs(root / 'meta')
    os.makedirs(root / 'loose_crop')
    lines = []
    for i in range(3):
        matrix = similarity(0.1 * i, 1.2 + 0.1 * i, (20.0 + i, 25.0))
        face = rng.integers(0, 256, (112, 112, 3), np.uint8)
        cv2.imwrite(str(root / 'loose_crop' / f'{i}.png'),
                    cv2.warpAffine(face, matrix, (180, 180)))
        points = apply(matrix, ARCFACE_LANDMARKS).ravel()
        lines.append(f'{i}.png ' + ' '.join(f'{v:.3f}' for v in points) +
                     f' {0.9 + 0.01 * i}\n')
    (root / 'meta' / 'ijbc_name_5pts_score.txt').write_text(''.join(lines))
    (root / 'meta' / 'ijbc_face_tid_mid.txt').write_text(
        '0.png 1 10\n1.png 2 20\n2.png 3 30\n')
    (root / 'meta' / 'ijbc_template_pair_label.txt').write_text(
        '1 2 1\n1 3 0\n2 3 0\n')


def test_eval_ijb_end_to_end(tmp_path):
    write_ijb(tmp_path / 'IJBC', np.random.default_rng(0))
    config = tmp_path / 'r18.py'
    config.write_text("model = dict(type='FaceRecognizer', backbone=dict("
                      "type='IResNet', depth=18, embedding_size=16))\n")
    eval_ijb = load_eval_ijb()
    from mmengine.registry import init_default_scope

    from mmpfc.registry import MODELS
    init_default_scope('mmpfc')
    torch.manual_seed(0)
    model = MODELS.build(dict(type='FaceRecognizer', backbone=dict(
        type='IResNet', depth=18, embedding_size=16)))
    torch.save(model.backbone.state_dict(), tmp_path / 'backbone.pth')
    tars = eval_ijb.main([
        str(config), str(tmp_path / 'backbone.pth'), '--data-root',
        str(tmp_path / 'IJBC'), '--out-dir', str(tmp_path / 'out'),
        '--num-workers', '0', '--batch-size', '2'
    ])
    assert sorted(tars) == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert all(0 <= tar <= 1 for tar in tars.values())
    scores = np.load(tmp_path / 'out' / 'ijbc_r18_scores.npy')
    assert scores.shape == (3, ) and np.all(np.abs(scores) <= 1 + 1e-6)
    assert os.path.getsize(tmp_path / 'out' / 'ijbc_r18_roc.png') > 1000


def test_missing_or_undecodable_crop_names_its_path(tmp_path):
    from mmpfc.evaluation.functional.ijb import read_ijb_meta
    write_ijb(tmp_path / 'IJBC', np.random.default_rng(0))
    meta = read_ijb_meta(str(tmp_path / 'IJBC'))
    crops = tmp_path / 'IJBC' / 'loose_crop'
    os.remove(crops / '1.png')
    (crops / '2.png').write_bytes(b'\x89PNG broken')
    faces = load_eval_ijb().AlignedFaces(str(crops), meta['names'],
                                         meta['landmarks'])
    assert faces[0].shape == (112, 112, 3) and faces[0].dtype == np.uint8
    with pytest.raises(FileNotFoundError) as err:
        faces[1]
    assert_mentions(err, str(crops / '1.png'), 'does not exist')
    with pytest.raises(ValueError) as err:
        faces[2]
    assert_mentions(err, str(crops / '2.png'), 'cannot decode', '11 bytes')


def _edit(path, old, new):
    path.write_text(path.read_text().replace(old, new, 1))


PTS, TID, PAIRS = ('ijbc_name_5pts_score.txt', 'ijbc_face_tid_mid.txt',
                   'ijbc_template_pair_label.txt')


@pytest.mark.parametrize('name, old, new, named', [
    ('name_5pts_score', ' 0.91\n', ' x\n',
     (f'{PTS}, line 2', '12 fields', "'1.png ", " x'")),
    ('name_5pts_score', ' 0.91\n', '\n', (f'{PTS}, line 2', '12 fields')),
    ('face_tid_mid', '0.png 1 10\n1.png', '1.png 1 10\n0.png',
     (f'{TID}, line 1', "'1.png'", f'{PTS}, line 1', "'0.png'")),
    ('face_tid_mid', '2.png 3 30\n', '', (f'{TID} lists 2', f'{PTS} 3')),
    ('face_tid_mid', '1.png 2 20', '1.png 2',
     (f'{TID}, line 2', '3 fields', "'1.png 2'")),
    ('template_pair_label', '1 3 0', '1 3 2',
     (f'{PAIRS}: pair 1 [1, 3, 2]', 'label 2', '0 or 1')),
    ('template_pair_label', '2 3 0', '2 7 0',
     (f'{PAIRS}: pair 2 [2, 7, 0]', 'template 7', TID)),
    ('template_pair_label', '2 3 0', '2 3 no', (PAIRS, '3 integers')),
])
def test_bad_meta_line_names_file_and_line(tmp_path, name, old, new, named):
    """Named: the file, the line or pair, and what is wrong in it."""
    from mmpfc.evaluation.functional.ijb import read_ijb_meta
    write_ijb(tmp_path / 'IJBC', np.random.default_rng(0))
    _edit(tmp_path / 'IJBC' / 'meta' / f'ijbc_{name}.txt', old, new)
    with pytest.raises(ValueError) as err:
        read_ijb_meta(str(tmp_path / 'IJBC'))
    assert_mentions(err, str(tmp_path / 'IJBC' / 'meta'))
    assert_in_order(err, *named)  # each value in its place


def run_tool(tmp_path, config, checkpoint):
    """Run tools/eval_ijb.py on the set under ``tmp_path / 'IJBC'``."""
    return load_eval_ijb().main([
        str(config), str(checkpoint), '--data-root', str(tmp_path / 'IJBC'),
        '--out-dir', str(tmp_path / 'out'), '--num-workers', '0',
        '--batch-size', '2'
    ])


def aligned_faces(root):
    """The set's crops aligned from their landmarks, RGB (N, 112, 112, 3)."""
    from mmpfc.evaluation.functional.ijb import read_ijb_meta
    meta = read_ijb_meta(str(root))
    return np.stack([
        align_face(cv2.imread(str(root / 'loose_crop' / name))[..., ::-1],
                   points) for name, points in zip(meta['names'],
                                                   meta['landmarks'])])


def test_eval_ijb_uses_the_whole_checkpoint_neck_included(tmp_path):
    """Backbone + LinearNeck: the tool's pair scores are the cosines of the
    flip-summed raw embeddings computed here with the saved backbone and
    neck weights; a fresh neck (loading only ``backbone.*``) scores
    otherwise."""
    write_ijb(tmp_path / 'IJBC', np.random.default_rng(0))
    model = save_neck_checkpoint(tmp_path / 'neck.pth')
    config = tmp_path / 'neck.py'
    Config(dict(model=NECK_MODEL)).dump(str(config))
    run_tool(tmp_path, config, tmp_path / 'neck.pth')
    scores = np.load(tmp_path / 'out' / 'ijbc_neck_scores.npy')
    faces = aligned_faces(tmp_path / 'IJBC')

    def pair_cosines(raw):
        # one image per template: a template is its image's direction, so
        # the detector score does not matter; pairs (1, 2), (1, 3), (2, 3)
        unit = unit_rows(raw)
        return np.array([unit[0] @ unit[1], unit[0] @ unit[2],
                         unit[1] @ unit[2]])

    expected = pair_cosines(neck_by_hand(model, faces, flip=True))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    wrong = pair_cosines(neck_by_hand(fresh_neck(model), faces, flip=True))
    assert np.abs(wrong - expected).max() > 0.05
    # the tool's image embeddings: raw (norm kept), mirror added
    from mmpfc.apis import init_recognizer
    from mmpfc.evaluation.functional.ijb import read_ijb_meta
    meta = read_ijb_meta(str(tmp_path / 'IJBC'))
    eval_ijb = load_eval_ijb()
    dataset = eval_ijb.AlignedFaces(str(tmp_path / 'IJBC' / 'loose_crop'),
                                    meta['names'], meta['landmarks'])
    recognizer = init_recognizer(str(tmp_path / 'neck.pth'))
    np.testing.assert_allclose(
        eval_ijb.extract(recognizer, dataset, batch_size=2, num_workers=0),
        neck_by_hand(model, faces, flip=True), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        eval_ijb.extract(recognizer, dataset, 2, 0, flip=False),
        neck_by_hand(model, faces, flip=False), rtol=1e-4, atol=1e-4)


def test_insightface_backbone_file_refused_for_a_model_with_neck(tmp_path):
    from mmpfc.checkpoint import CheckpointError
    write_ijb(tmp_path / 'IJBC', np.random.default_rng(0))
    model = save_neck_checkpoint(tmp_path / 'neck.pth')
    torch.save(model.backbone.state_dict(), tmp_path / 'backbone.pth')
    config = tmp_path / 'neck.py'
    Config(dict(model=NECK_MODEL)).dump(str(config))
    with pytest.raises(CheckpointError) as err:
        run_tool(tmp_path, config, tmp_path / 'backbone.pth')
    assert_mentions(err, str(tmp_path / 'backbone.pth'),
                    '7 missing in the checkpoint', 'neck.fc')


def test_checkpoint_that_is_not_torch_is_named(tmp_path):
    from mmpfc.checkpoint import CheckpointError
    write_ijb(tmp_path / 'IJBC', np.random.default_rng(0))
    config = tmp_path / 'r18.py'
    config.write_text("model = dict(type='FaceRecognizer', backbone=dict("
                      "type='IResNet', depth=18, embedding_size=16))\n")
    (tmp_path / 'notes.pth').write_text('hello')
    with pytest.raises(CheckpointError) as err:
        run_tool(tmp_path, config, tmp_path / 'notes.pth')
    assert_mentions(err, str(tmp_path / 'notes.pth'),
                    'not a torch checkpoint', "b'hello'")
