"""IResNet and MobileFaceNet: shapes, insightface parameter names, counts."""
import pytest
import torch
from messages import assert_mentions

import mmpfc  # noqa: F401
from mmpfc.registry import MODELS

IRESNET = dict(type='IResNet', depth=18)
MBF = dict(type='MobileFaceNet')
BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 14, 3)}
WIDTHS = (64, 128, 256, 512)
BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def build(defaults, **overrides):
    return MODELS.build({**defaults, **overrides})


def faces(n=2):
    return torch.randn(n, 3, 112, 112)


def embed(model, n=2):
    """Eval-mode embedding, checking the one-tuple backbone convention."""
    with torch.no_grad():
        out = model.eval()(faces(n))
    assert isinstance(out, tuple) and len(out) == 1
    return out[0]


def bn_keys(prefix):
    return {f'{prefix}.{name}' for name in BN}


def iresnet_keys(depth):
    """insightface's state-dict keys, written out from its naming scheme."""
    keys = {'conv1.weight', 'prelu.weight', 'fc.weight', 'fc.bias'}
    keys |= bn_keys('bn1') | bn_keys('bn2') | bn_keys('features')
    for stage, blocks in enumerate(BLOCKS[depth], start=1):
        for b in range(blocks):
            p = f'layer{stage}.{b}'
            keys |= {f'{p}.conv1.weight', f'{p}.conv2.weight',
                     f'{p}.prelu.weight'}
            keys |= bn_keys(f'{p}.bn1') | bn_keys(f'{p}.bn2') | \
                bn_keys(f'{p}.bn3')
            if b == 0:
                keys |= {f'{p}.downsample.0.weight'}
                keys |= bn_keys(f'{p}.downsample.1')
    return keys


def iresnet_param_count(depth, emb=512):
    """Parameters (trainable or not) from the architecture formula."""
    bn = 2
    total = 3 * 9 * 64 + bn * 64 + 64  # stem conv, bn1, prelu
    cin = 64
    for c, blocks in zip(WIDTHS, BLOCKS[depth]):
        for b in range(blocks):
            total += bn * cin + 9 * cin * c + bn * c + c + 9 * c * c + bn * c
            if b == 0:
                total += cin * c + bn * c  # 1x1 shortcut conv + BN
            cin = c
    total += bn * 512 + (512 * 7 * 7 + 1) * emb + bn * emb
    return total


def test_iresnet_output_shape_and_tuple():
    assert embed(build(IRESNET)).shape == (2, 512)
    assert embed(build(IRESNET, embedding_size=128), 1).shape == (1, 128)


@pytest.mark.parametrize('depth', [18, 50])
def test_iresnet_insightface_state_dict_keys(depth):
    model = build(IRESNET, depth=depth)
    state = model.state_dict()
    assert set(state) == iresnet_keys(depth)
    assert state['conv1.weight'].shape == (64, 3, 3, 3)
    assert state['layer1.0.conv2.weight'].shape == (64, 64, 3, 3)
    assert state['layer2.0.downsample.0.weight'].shape == (128, 64, 1, 1)
    assert state['fc.weight'].shape == (512, 512 * 7 * 7)
    assert state['features.weight'].shape == (512, )
    # the strict load of an insightface backbone.pth is a state-dict load
    fresh = build(IRESNET, depth=depth)
    fresh.load_state_dict(state, strict=True)


def test_iresnet50_parameter_count():
    model = build(IRESNET, depth=50)
    count = sum(p.numel() for p in model.parameters())
    assert count == iresnet_param_count(50) == 43_590_848  # "43.6M"
    assert sum(p.numel() for p in build(IRESNET).parameters()) == \
        iresnet_param_count(18)


def test_iresnet_features_scale_frozen_at_one():
    model = build(IRESNET).train()
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))
    model(faces())[0].sum().backward()
    assert model.features.weight.grad is None
    assert model.features.bias.grad is not None
    assert model.fc.weight.grad is not None


def test_iresnet_batchnorm_settings():
    model = build(IRESNET)
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.eps == 1e-5 and m.momentum == 0.1
                         for m in norms)


def test_iresnet_invalid_depth():
    with pytest.raises(ValueError) as err:
        build(IRESNET, depth=42)
    assert_mentions(err, 'IResNet', 'depth 42', '[18, 34, 50, 100, 200]')


def test_iresnet_zero_init_residual():
    model = build(IRESNET, zero_init_residual=True).eval()
    block = model.layer1[1]  # no downsample: must start as the identity
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        assert torch.equal(block(x), x)
    assert torch.equal(block.bn1.weight, torch.ones(64))


def test_iresnet_fp16_keeps_fc_in_fp32():
    out = embed(build(IRESNET, fp16=True))
    assert out.dtype == torch.float32 and out.shape == (2, 512)
    assert torch.isfinite(out).all()


def test_mobilefacenet_shape_and_keys():
    model = build(MBF)
    assert embed(model).shape == (2, 512)
    state = model.state_dict()
    expected = {
        'layers.0.layers.0.weight': (128, 3, 3, 3),
        'layers.0.layers.2.weight': (128, ),
        'layers.1.layers.0.weight': (128, 2, 3, 3),  # groups=64
        'layers.2.layers.1.layers.0.weight': (128, 1, 3, 3),
        'layers.3.layers.3.layers.2.layers.1.running_var': (128, ),
        'layers.7.layers.1.layers.0.layers.0.weight': (256, 256, 1, 1),
        'conv_sep.layers.0.weight': (512, 256, 1, 1),
        'features.layers.0.layers.0.weight': (512, 1, 7, 7),  # GDC
        'features.layers.2.weight': (512, 512),
        'features.layers.3.running_mean': (512, ),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert 'features.layers.2.bias' not in state
    assert len(model.layers) == 8
    assert len(model.layers[5].layers) == 6  # blocks[2]


def test_mobilefacenet_large_variant_and_blocks_check():
    model = build(MBF, blocks=(2, 8, 12, 4), scale=4, embedding_size=256)
    state = model.state_dict()
    assert state['layers.0.layers.0.weight'].shape == (256, 3, 3, 3)
    assert len(model.layers[1].layers) == 2  # residual first stage
    assert state['features.layers.2.weight'].shape == (256, 512)
    with pytest.raises(ValueError) as err:
        build(MBF, blocks=(1, 2, 3))
    assert_mentions(err, 'MobileFaceNet', 'blocks', '4', 'got (1, 2, 3)')


def test_mobilefacenet_loads_raw_checkpoint_via_init_cfg(tmp_path):
    """insightface ships bare state dicts; Pretrained must load them."""
    source = build(MBF)
    with torch.no_grad():
        source.features.layers[3].running_mean.fill_(0.25)
    path = tmp_path / 'backbone.pth'
    torch.save(source.state_dict(), path)
    model = build(MBF, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
