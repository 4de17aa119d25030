"""mmpfc.apis: load a checkpoint, get (L2-normalized) embeddings."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from embedding_models import (MODEL, NECK_MODEL, fresh_neck, neck_by_hand,
                              save_neck_checkpoint, unit_rows)
from messages import assert_mentions
from mmengine.config import Config
from tiny_training import build_runner, calibrate_bn, make_cfg

from mmpfc.apis import embed_batch, extract_embeddings, init_recognizer
from mmpfc.checkpoint import CheckpointError
from mmpfc.registry import MODELS


@pytest.fixture(scope='module')
def face_model(tmp_path_factory):
    """A checkpoint as MMEngine writes it (config in meta) and its model."""
    folder = tmp_path_factory.mktemp('face')
    model = calibrate_bn(MODELS.build(MODEL))
    path = str(folder / 'model.pth')
    torch.save(dict(meta=dict(cfg=Config(dict(model=MODEL)).pretty_text),
                    state_dict=model.state_dict()), path)
    return path, model


def rgb_faces(count=3, size=112):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def reference(model, rgb):
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return F.normalize(model.extract_feat((x - 0.5) / 0.5)[-1], dim=1)


def test_paths_and_arrays(face_model, tmp_path):
    path, model = face_model
    recognizer = init_recognizer(path)
    assert recognizer.head is None
    faces = rgb_faces()
    files = []
    for i, face in enumerate(faces):
        files.append(str(tmp_path / f'{i}.png'))
        cv2.imwrite(files[-1], face[..., ::-1])  # files are BGR on disk
    from_files = extract_embeddings(recognizer, files)
    from_arrays = extract_embeddings(recognizer, list(faces), batch_size=2)
    assert from_files.shape == (3, 16) and from_files.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(from_files, axis=1), 1,
                               rtol=1e-5)
    np.testing.assert_allclose(from_files, from_arrays, atol=1e-6)
    np.testing.assert_allclose(from_arrays, reference(model, faces).numpy(),
                               atol=1e-5)
    single = extract_embeddings(recognizer, faces[0])
    np.testing.assert_allclose(single[0], from_arrays[0], atol=1e-6)


def test_flip_and_resize(face_model):
    path, model = face_model
    recognizer = init_recognizer(path, config=dict(model=MODEL))
    faces = rgb_faces(2)
    flipped = extract_embeddings(recognizer, faces, flip=True)
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        summed = model.extract_feat(x)[-1] + model.extract_feat(
            x.flip(3))[-1]
    np.testing.assert_allclose(flipped, F.normalize(summed).numpy(),
                               atol=1e-5)
    big = np.stack([cv2.resize(f, (150, 150)) for f in faces])
    assert extract_embeddings(recognizer, big).shape == (2, 16)


def test_sharded_checkpoint_and_wrong_model(tmp_path, face_model):
    runner = build_runner(make_cfg(tmp_path, max_iters=2))
    runner.train()
    recognizer = init_recognizer(str(tmp_path / 'iter_2.pth'))
    trained = runner.model.backbone.state_dict()
    for key, value in recognizer.backbone.state_dict().items():
        assert torch.equal(value, trained[key])
    grey = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 1),
                                             dtype=np.uint8)
    emb = extract_embeddings(recognizer, grey, input_size=None)
    assert emb.shape == (4, 120)
    with pytest.raises(CheckpointError) as err:
        init_recognizer(face_model[0], config=runner.cfg)
    # the LeNet's first conv, which the face model's file has not
    assert_mentions(err, face_model[0], 'missing in the checkpoint',
                    'backbone.features.0.weight')


def test_missing_or_undecodable_image_names_its_path(face_model, tmp_path):
    recognizer = init_recognizer(face_model[0])
    good = str(tmp_path / 'good.png')
    cv2.imwrite(good, rgb_faces(1)[0])
    with pytest.raises(FileNotFoundError) as err:
        extract_embeddings(recognizer, [good, str(tmp_path / 'nope.png')])
    assert_mentions(err, str(tmp_path / 'nope.png'), 'does not exist')
    (tmp_path / 'bad.png').write_bytes(b'not png')
    with pytest.raises(ValueError) as err:
        extract_embeddings(recognizer, [good, tmp_path / 'bad.png'])
    assert_mentions(err, str(tmp_path / 'bad.png'), 'cannot decode',
                    '7 bytes', "b'not png'")
    assert extract_embeddings(recognizer, tmp_path / 'good.png').shape == (
        1, 16)


def test_neck_weights_raw_and_normalized(tmp_path):
    model = save_neck_checkpoint(tmp_path / 'neck.pth')
    recognizer = init_recognizer(str(tmp_path / 'neck.pth'))
    faces = rgb_faces(3)
    expected = neck_by_hand(model, faces, flip=True)
    raw = extract_embeddings(recognizer, faces, batch_size=2, flip=True,
                             normalize=False)
    assert raw.shape == (3, 8) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        extract_embeddings(recognizer, faces, flip=True),
        unit_rows(expected), atol=1e-5)
    np.testing.assert_allclose(
        embed_batch(recognizer, faces, flip=False, normalize=False),
        neck_by_hand(model, faces, flip=False), rtol=1e-4, atol=1e-4)
    # the check can see a wrong neck: a fresh one embeds elsewhere
    wrong = unit_rows(neck_by_hand(fresh_neck(model), faces, flip=True))
    assert np.abs(wrong - unit_rows(expected)).max() > 0.1


def test_lazy_iterable_and_bad_batch_size(face_model):
    recognizer = init_recognizer(face_model[0])
    faces = rgb_faces(3)
    lazy = extract_embeddings(recognizer, (f for f in faces), batch_size=2)
    np.testing.assert_allclose(lazy, reference(face_model[1], faces),
                               atol=1e-5)
    with pytest.raises(ValueError) as err:
        extract_embeddings(recognizer, faces, batch_size=0)
    assert_mentions(err, 'batch_size=0', 'positive')
    with pytest.raises(ValueError) as err:
        embed_batch(recognizer, [])
    assert_mentions(err, 'embed_batch', 'no images')


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_bare_backbone_file(face_model, tmp_path, prefix):
    """insightface's backbone.pth: a bare state dict of the backbone."""
    model = face_model[1]
    path = str(tmp_path / 'backbone.pth')
    torch.save({prefix + k: v for k, v in model.backbone.state_dict().items()},
               path)
    recognizer = init_recognizer(path, config=dict(model=MODEL))
    faces = rgb_faces(2)
    np.testing.assert_allclose(extract_embeddings(recognizer, faces),
                               reference(model, faces), atol=1e-5)


def test_backbone_only_file_refused_for_a_model_with_neck(tmp_path):
    model = save_neck_checkpoint(tmp_path / 'neck.pth')
    path = str(tmp_path / 'backbone.pth')
    torch.save(model.backbone.state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        init_recognizer(path, config=dict(model=NECK_MODEL))
    # the file, the neck's 7 weights it lacks, and why: a bare backbone
    assert_mentions(err, path, '7 missing in the checkpoint',
                    'neck.fc.weight, neck.fc.bias, neck.norm',
                    'bare backbone state dict', 'no neck weights')
