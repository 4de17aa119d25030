"""Tiny embedding models (with and without a neck) and hand-written forwards
of them, for the inference API and the tools that embed images."""
import numpy as np
import torch
from mmengine.config import Config
from tiny_training import calibrate_bn

from mmpfc.registry import MODELS

MODEL = dict(type='FaceRecognizer',
             backbone=dict(type='MobileFaceNet', embedding_size=16,
                           blocks=(1, 1, 1, 1), scale=1),
             head=dict(type='PartialFCHead', num_classes=10, in_channels=16))
# the ViT-T configs' neck (fc + BatchNorm) on the tiny backbone
NECK_MODEL = dict(MODEL,
                  neck=dict(type='mmpretrain.LinearNeck', in_channels=16,
                            out_channels=8, gap_dim=0,
                            norm_cfg=dict(type='BN1d')),
                  head=dict(type='PartialFCHead', num_classes=10,
                            in_channels=8))


def save_neck_checkpoint(path):
    """Save a backbone + LinearNeck model as MMEngine does (config in meta)
    and return it; its neck weights are drawn from their own generator, so
    no freshly built neck has them."""
    model = calibrate_bn(MODELS.build(NECK_MODEL))
    gen = torch.Generator().manual_seed(7)
    fc, bn = model.neck.fc, model.neck.norm
    with torch.no_grad():
        fc.weight.copy_(torch.randn(8, 16, generator=gen))
        fc.bias.copy_(torch.randn(8, generator=gen))
        bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(8, generator=gen))
        bn.running_mean.copy_(torch.randn(8, generator=gen))
        bn.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    torch.save(dict(meta=dict(cfg=Config(dict(model=NECK_MODEL)).pretty_text),
                    state_dict=model.state_dict()), str(path))
    return model


def neck_by_hand(model, rgb, flip):
    """Raw embeddings of RGB uint8 faces (N, H, W, 3): insightface's scaling
    (x / 255 - 0.5) / 0.5, ``model.backbone``, then the neck's fc and
    eval-mode BatchNorm written out; with ``flip``, plus the mirror's."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2)
    x = (x.float() / 255 - 0.5) / 0.5
    fc, bn = model.neck.fc, model.neck.norm

    def embed(images):
        y = model.backbone(images)[-1] @ fc.weight.T + fc.bias
        return (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) \
            * bn.weight + bn.bias

    with torch.no_grad():
        raw = embed(x) + embed(x.flip(3)) if flip else embed(x)
    return raw.double().numpy()


def unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fresh_neck(model):
    """``model``'s backbone with a newly initialized neck: what loading
    only the ``backbone.*`` weights gives."""
    torch.manual_seed(0)
    other = MODELS.build(dict(NECK_MODEL, head=None))
    other.backbone.load_state_dict(model.backbone.state_dict())
    return other.eval()
