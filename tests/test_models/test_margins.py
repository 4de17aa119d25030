"""The margin zoo against float64 dense computations written from the formulas.

Every margin (CurricularFace, AdaFace, MagFace, ElasticFace) runs a few steps
on ``PartialFCHead`` (the fused step) and on ``MarginSoftmaxHead`` (the plain
composition); each step's loss and feature gradient, the center gradient and
the running statistics are compared with :func:`reference`, which recomputes
the step densely with plain torch ops (normalize, one-hot, arccos,
``F.cross_entropy``), never calling mmpfc. The distributed version (one spawn
per world size, every margin, model parallel and sample rate 0.1, uneven
shards) lives in ``test_margins_dist.py``.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from margin_references import (BATCH, DIM, MARGINS, NUM_CLASSES, START, STEPS,
                               batch, check_state, reference, rel_err,
                               state_of)
from messages import assert_mentions

import mmpfc  # noqa: F401
from mmpfc.registry import MODELS


# ---------------------------------------------------- one process, 3 steps
@pytest.mark.parametrize('head_type', ['PartialFCHead', 'MarginSoftmaxHead'])
@pytest.mark.parametrize('name', list(MARGINS))
def test_margin_matches_dense_reference(name, head_type):
    cfg = MARGINS[name]
    head = MODELS.build(dict(type=head_type, num_classes=NUM_CLASSES,
                             in_channels=DIM, loss=cfg, seed=3)).double()
    margin = head.margin_loss
    state = START.get(name, {})
    assert state_of(name, margin) == pytest.approx(state)
    worst = 0.0
    for step in range(STEPS):
        emb, labels = batch(step, BATCH)
        feats = emb.clone().requires_grad_(True)
        head.weight.grad = None
        loss = head.loss_by_labels(feats, labels)
        loss.backward()
        margins = None
        if name.startswith('elastic'):
            margins = margin.row_margins(torch.zeros(BATCH,
                                                     dtype=torch.float64))
        ref_loss, ref_e, ref_w, state = reference(
            name, cfg, head.weight, emb, labels, state, margins)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-11)
        worst = max(worst, rel_err(feats.grad, ref_e),
                    rel_err(head.weight.grad, ref_w))
        check_state(name, margin, state)
    assert worst < 1e-9, worst
    print(f'{head_type} {name}: max rel err of the gradients {worst:.1e}')


def test_curricular_face_hard_negatives_and_slope():
    """Hard non-targets (above the row's cos(theta + m)) become
    cos (t + cos); the explicit slope equals autograd's."""
    margin = MODELS.build(dict(type='CurricularFaceLoss', m=0.5))
    margin.t.fill_(0.3)
    cos_t = torch.tensor([[0.8], [-0.2]], dtype=torch.float64)
    cos = torch.tensor([[0.5, 0.2], [-0.5, -0.8]], dtype=torch.float64)
    out = margin.non_target_logit(cos, cos_t)
    thr = torch.cos(torch.acos(cos_t) + 0.5)  # 0.3594, -0.6301
    hard = cos > thr
    assert hard.tolist() == [[True, False], [True, False]]
    assert torch.allclose(out, torch.where(hard, cos * (0.3 + cos), cos))
    explicit = margin.non_target_slope(cos, cos_t)
    generic = type(margin).__mro__[1].non_target_slope(margin, cos, cos_t)
    assert torch.allclose(explicit, generic)
    assert torch.allclose(explicit, torch.where(hard, 0.3 + 2 * cos,
                                                torch.ones_like(cos)))


def test_statistics_do_not_move_in_eval_mode():
    for name in ('curricular', 'adaface', 'elastic_arc'):
        head = MODELS.build(dict(type='PartialFCHead',
                                 num_classes=NUM_CLASSES, in_channels=DIM,
                                 loss=MARGINS[name])).double().eval()
        before = {k: v.clone() for k, v in head.margin_loss.state_dict(
        ).items()}
        emb, labels = batch(0, BATCH)
        with torch.no_grad():
            head.loss_by_labels(emb, labels)
        after = head.margin_loss.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), name


def test_running_statistics_are_saved_with_the_model():
    head = MODELS.build(dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                             in_channels=DIM, loss=MARGINS['adaface']))
    emb, labels = batch(0, BATCH)
    head.loss_by_labels(emb.float(), labels)
    keys = {k for k in head.state_dict() if k.startswith('margin_loss.')}
    assert keys == {'margin_loss.batch_mean', 'margin_loss.batch_std'}
    twin = MODELS.build(dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                             in_channels=DIM, loss=MARGINS['adaface']))
    twin.load_state_dict(head.state_dict())
    assert twin.margin_loss.batch_mean.item() == \
        head.margin_loss.batch_mean.item() != 20.0


# ------------------------------------------------------------- ElasticFace
def elastic(**kwargs):
    return MODELS.build(dict(type='ElasticFaceLoss', **kwargs))


def draw(margin, cos_t):
    from mmpfc.models.losses import MarginBatch
    margin.begin_step(MarginBatch(cos_t))
    return margin.row_margins(cos_t)


def test_elastic_margins_are_normal_and_resume_exactly():
    margin = elastic(m=0.5, std=0.05, seed=11)
    cos_t = torch.zeros(4000, dtype=torch.float64)
    first = draw(margin, cos_t)
    assert first.mean().item() == pytest.approx(0.5, abs=0.005)
    assert first.std().item() == pytest.approx(0.05, rel=0.05)
    assert margin.draws.item() == 1
    saved = {k: v.clone() for k, v in margin.state_dict().items()}
    second = draw(margin, cos_t)
    assert not torch.equal(first, second)  # a new draw every step
    # another module, another seed at construction: the state decides
    twin = elastic(m=0.5, std=0.05, seed=12)
    twin.load_state_dict(saved)
    assert torch.equal(draw(twin, cos_t), second)
    # identical whatever the number of rows (a row's draw is its own)
    twin.load_state_dict(saved)
    assert torch.equal(draw(twin, cos_t[:10]), second[:10])


def test_elastic_plus_gives_small_margins_to_easy_rows():
    plain, plus = elastic(std=0.1, seed=5), elastic(std=0.1, seed=5,
                                                    plus=True)
    cos_t = torch.rand(50, dtype=torch.float64, generator=torch.Generator(
    ).manual_seed(0)) * 2 - 1
    drawn, sorted_ = draw(plain, cos_t), draw(plus, cos_t)
    assert torch.equal(drawn.sort()[0], sorted_.sort()[0])  # same values
    by_cos = sorted_[cos_t.argsort(descending=True)]
    assert (by_cos[1:] >= by_cos[:-1]).all()  # easy rows: small margins


def test_elastic_eval_uses_the_mean_margin():
    margin = elastic(m=0.4, std=0.1).eval()
    cos_t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.equal(draw(margin, cos_t), torch.full_like(cos_t, 0.4))
    assert margin.draws.item() == 0


# ----------------------------------------------------------- bad input
@pytest.mark.parametrize('cfg,named', [
    (dict(type='CurricularFaceLoss', m=-0.1), ('m', '[0, pi)', '-0.1')),
    (dict(type='CurricularFaceLoss', t_alpha=1.5),
     ('t_alpha', '[0, 1]', '1.5')),
    (dict(type='CurricularFaceLoss', s=0.0), ('scale s', '> 0', '0.0')),
    (dict(type='AdaFaceLoss', m=-0.4), ('m', '[0, pi)', '-0.4')),
    (dict(type='AdaFaceLoss', h=-1.0), ('h', '>= 0', '-1.0')),
    (dict(type='AdaFaceLoss', t_alpha=-0.1), ('t_alpha', '[0, 1]', '-0.1')),
    (dict(type='MagFaceLoss', l_a=110.0, u_a=10.0),
     ('u_a', 'l_a=110.0', '10.0')),
    (dict(type='MagFaceLoss', l_a=0.0), ('l_a', '> 0', '0.0')),
    (dict(type='MagFaceLoss', l_m=0.9, u_m=0.8), ('u_m', 'l_m=0.9', '0.8')),
    (dict(type='MagFaceLoss', lambda_g=-1.0), ('lambda_g', '>= 0', '-1.0')),
    (dict(type='ElasticFaceLoss', std=-0.01), ('std', '>= 0', '-0.01')),
    (dict(type='ElasticFaceLoss', m=-0.5), ('m', '[0, pi)', '-0.5')),
    (dict(type='ElasticFaceLoss', kind='sphere'),
     ('kind', "['arc', 'cos']", "'sphere'")),
])
def test_bad_values_raise(cfg, named):
    """Named: the margin and the argument, its range, the value."""
    key, bound, value = named
    with pytest.raises(ValueError) as err:
        MODELS.build(cfg)
    assert_mentions(err, f"{cfg['type']}: {key} ", bound, f'got {value}')


@pytest.mark.parametrize('name', ['adaface', 'magface'])
def test_normalized_embeddings_warn_once(name):
    head = MODELS.build(dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                             in_channels=DIM, loss=MARGINS[name]))
    emb, labels = batch(0, BATCH)
    emb = F.normalize(emb.float(), dim=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        head.loss_by_labels(emb, labels)
        head.loss_by_labels(emb, labels)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert 'already L2-normalized' in messages[0]
    with warnings.catch_warnings():  # raw features: no warning
        warnings.simplefilter('error')
        fresh = MODELS.build(dict(type='PartialFCHead',
                                  num_classes=NUM_CLASSES, in_channels=DIM,
                                  loss=MARGINS[name]))
        fresh.loss_by_labels(batch(0, BATCH)[0].float(), labels)


def test_norm_based_margin_needs_norms():
    margin = MODELS.build(MARGINS['magface'])
    with pytest.raises(ValueError, match='needs the raw embedding norms'):
        margin(torch.zeros(2, 3), torch.tensor([0, 1]))


# ------------------------------------------------- the plain composition
def test_distributed_cross_entropy_reports_large_losses_exactly():
    """A row whose target probability underflows (loss > 69, once capped by
    a clamp of the probability at 1e-30) is reported exactly."""
    from mmpfc.models.utils import distributed_cross_entropy
    logits = torch.tensor([[0.0, 120.0, 3.0], [2.0, 1.0, 0.5]],
                          dtype=torch.float32, requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = distributed_cross_entropy(logits, labels)
    row0 = 120.0 + math.log1p(math.exp(-120.0) + math.exp(-117.0))
    row1 = math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.5)) - 1.0
    assert row0 > 69
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    loss.backward()
    expected = torch.softmax(logits.detach().double(), dim=1)
    expected[0, 0] -= 1
    expected[1, 1] -= 1
    assert torch.allclose(logits.grad.double(), expected / 2, atol=1e-7)


def test_third_party_margin_takes_the_plain_path():
    """A BaseMargin that overrides ``forward`` is not fused."""
    from mmpfc.models.heads.fused_margin_softmax import supports_fused
    from mmpfc.models.losses import BaseMargin, CurricularFaceLoss

    class Custom(CurricularFaceLoss):
        def forward(self, cos, labels, norms=None):
            return super().forward(cos, labels, norms)

    assert supports_fused(CurricularFaceLoss())
    assert not supports_fused(Custom())
    assert not supports_fused(torch.nn.Identity())
    assert issubclass(Custom, BaseMargin)


# ------------------------------------------------ a margin written by a user
def make_running_cosface():
    from mmpfc.models.losses import BaseMargin

    class RunningCosFace(BaseMargin):  # the example of docs/margins.md
        def __init__(self, s=64.0, m=0.35):
            super().__init__(s)
            self.m = m
            self.register_buffer('mean_cos', torch.zeros(()))

        def prepare(self, batch):
            if self.training:
                mean = batch.mean(batch.cos_t).to(self.mean_cos.dtype)
                self.mean_cos.mul_(0.99).add_(0.01 * mean)

        def target_logit(self, cos_t, norms=None):
            return cos_t - self.m * self.mean_cos.clamp(0, 1).to(
                cos_t.dtype)

    return RunningCosFace(s=16.0, m=0.35)


def test_a_new_margin_is_one_class_and_runs_fused():
    from mmpfc.models.heads import PartialFCHead
    from mmpfc.models.heads.fused_margin_softmax import supports_fused
    margin = make_running_cosface()
    assert supports_fused(margin)
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.5, loss=margin,
                         seed=1).double()
    emb, labels = batch(0, BATCH)
    head.weight.data.mul_(100)  # target cosines far from 0
    feats = emb.clone().requires_grad_(True)
    head.loss_by_labels(feats, labels).backward()
    cos = F.normalize(emb, dim=1) @ F.normalize(head.weight, dim=1).t()
    expected = 0.01 * cos[torch.arange(BATCH), labels].mean()
    assert margin.mean_cos.item() == pytest.approx(expected.item(),
                                                   rel=1e-12)
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0


# ------------------------------------------------------------- the configs
def margin_configs():
    import glob
    import os.path as osp

    from helpers import ROOT
    return sorted(glob.glob(osp.join(ROOT, 'configs', 'margins', '*.py')))


@pytest.mark.parametrize('path', margin_configs(),
                         ids=lambda p: p.rsplit('/', 1)[-1][:-3])
def test_margin_configs_build_their_head(path):
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    with open(path) as f:
        assert f.readline().startswith('# ')
    head_cfg = cfg.model.head
    loss = head_cfg.loss
    if 'subcenter' in path:  # ArcFace on K = 3 sub-centers per class
        assert loss.type == 'CombinedMarginLoss' and loss.m2 == 0.5
        assert head_cfg.num_subcenters == 3
    else:
        assert loss.type in ('CurricularFaceLoss', 'AdaFaceLoss',
                             'MagFaceLoss', 'ElasticFaceLoss')
        assert not {'m1', 'm2', 'm3'} & set(loss)  # the base's loss is gone
    demo = 'demo_cpu' in path
    assert head_cfg.num_classes == (1000 if demo else 93431)
    assert head_cfg.sample_rate == (0.1 if demo else 1.0)
    head = MODELS.build(dict(head_cfg, num_classes=50))
    emb, labels = batch(0, BATCH)
    feats = F.pad(emb.float(), (0, head.in_channels - DIM))
    loss_value = head.loss_by_labels(feats, labels)
    assert torch.isfinite(loss_value)
