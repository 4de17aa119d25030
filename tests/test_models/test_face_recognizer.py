"""FaceRecognizer: modes, default [-1, 1] preprocessing, channel order."""
import pytest
import torch
import torch.nn as nn
from messages import assert_mentions
from mmengine.optim import OptimWrapper
from mmpretrain.structures import DataSample

import mmpfc  # noqa: F401
from mmpfc.registry import MODELS


@MODELS.register_module(name='_StubFaceHead', force=True)
class StubHead(nn.Module):
    """Stand-in with the head interface: loss / predict on the feats tuple."""

    def __init__(self, in_channels=512, num_classes=3):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def loss(self, feats, data_samples):
        labels = torch.cat([s.gt_label for s in data_samples])
        logits = self.fc(feats[-1])
        return dict(loss=nn.functional.cross_entropy(logits, labels))

    def predict(self, feats, data_samples=None):
        if data_samples is None:
            data_samples = [DataSample() for _ in range(len(feats[-1]))]
        for sample, emb in zip(data_samples, feats[-1]):
            sample.set_field(emb, 'pred_feat', field_type='data')
        return data_samples


class DoubleNeck(nn.Module):

    def forward(self, feats):
        return tuple(2 * f for f in feats)


DEFAULTS = dict(type='FaceRecognizer',
                backbone=dict(type='IResNet', depth=18, embedding_size=16),
                head=dict(type='_StubFaceHead', in_channels=16))


def build(**overrides):
    return MODELS.build({**DEFAULTS, **overrides})


def batch(n=2):
    images = [torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8)
              for _ in range(n)]
    samples = [DataSample().set_gt_label(i % 3) for i in range(n)]
    return dict(inputs=images, data_samples=samples)


def test_modes():
    model = build().eval()
    data = model.data_preprocessor(batch(), training=False)
    inputs, samples = data['inputs'], data['data_samples']
    assert inputs.dtype == torch.float32 and inputs.shape == (2, 3, 112, 112)
    with torch.no_grad():
        feats = model(inputs, mode='tensor')
        losses = model(inputs, samples, mode='loss')
        preds = model(inputs, samples, mode='predict')
    assert isinstance(feats, tuple) and feats[-1].shape == (2, 16)
    assert set(losses) == {'loss'} and losses['loss'].ndim == 0
    assert len(preds) == 2
    assert torch.equal(preds[1].pred_feat, feats[-1][1])
    assert torch.equal(model.extract_feat(inputs)[-1], feats[-1])


def test_invalid_mode_and_missing_head():
    model = build().eval()
    x = torch.zeros(1, 3, 112, 112)
    with pytest.raises(ValueError) as err:
        model(x, mode='logits')
    assert_mentions(err, "'logits'", "('tensor', 'loss', 'predict')")
    headless = build(head=None).eval()
    with torch.no_grad():
        assert headless(x)[-1].shape == (1, 16)
    with pytest.raises(RuntimeError) as err:
        headless(x, mode='predict')
    assert_mentions(err, "mode='predict'", 'no head', "mode='tensor'")
    with pytest.raises(ValueError) as err:
        model(x, mode='loss')
    assert_mentions(err, "mode='loss'", 'data_samples')


def test_neck_is_applied():
    model = build(neck=DoubleNeck()).eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], 2 * model.backbone(x)[-1])


def test_default_preprocessor_maps_uint8_to_unit_range():
    model = build()
    image = torch.zeros(3, 112, 112, dtype=torch.uint8)
    image[:, :56] = 255
    out = model.data_preprocessor(dict(inputs=[image]))['inputs']
    assert torch.equal(out[0, :, :56], torch.ones(3, 56, 112))
    assert torch.equal(out[0, :, 56:], -torch.ones(3, 56, 112))
    # RGB order is kept by default
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    image[2] = 255
    out = model.data_preprocessor(dict(inputs=[image]))['inputs'][0]
    assert (out[2] == 1.0).all() and (out[0] == -1.0).all()


def test_preprocessor_flips_bgr_when_configured():
    model = build(data_preprocessor=dict(to_rgb=True))
    bgr = torch.zeros(3, 4, 4, dtype=torch.uint8)
    bgr[0] = 255  # blue
    out = model.data_preprocessor(dict(inputs=[bgr]))['inputs'][0]
    assert (out[2] == 1.0).all(), 'blue must move to the last channel'
    assert (out[0] == -1.0).all() and (out[1] == -1.0).all()


def test_custom_preprocessor_is_used_as_given():
    model = build(data_preprocessor=dict(
        type='mmpretrain.ClsDataPreprocessor', mean=[0.0] * 3,
        std=[255.0] * 3))
    image = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = model.data_preprocessor(dict(inputs=[image]))['inputs']
    assert torch.equal(out, torch.ones(1, 3, 2, 2))
    with pytest.raises(TypeError) as err:
        build(data_preprocessor='ClsDataPreprocessor')
    assert_mentions(err, 'FaceRecognizer', 'data_preprocessor',
                    "got 'ClsDataPreprocessor' (str)")


def test_train_step_updates_backbone():
    model = build()
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.backbone.fc.weight.detach().clone()
    log_vars = model.train_step(batch(), wrapper)
    assert torch.isfinite(log_vars['loss'])
    assert not torch.equal(model.backbone.fc.weight, before)
    preds = model.eval().test_step(batch())
    assert preds[0].pred_feat.shape == (16, )
