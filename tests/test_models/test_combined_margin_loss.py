"""CombinedMarginLoss and the distributed cross-entropy on one process."""
import math

import pytest
import torch
import torch.nn.functional as F
from messages import assert_mentions

import mmpfc  # noqa: F401
from mmpfc.models.utils import distributed_cross_entropy
from mmpfc.registry import MODELS

DEFAULTS = dict(type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5, m3=0.0)


def build(**overrides):
    return MODELS.build({**DEFAULTS, **overrides})


@pytest.mark.parametrize('margins,expected', [
    (dict(m1=1.0, m2=0.5, m3=0.0), lambda t: math.cos(t + 0.5)),
    (dict(m1=1.0, m2=0.0, m3=0.4), lambda t: math.cos(t) - 0.4),
    (dict(m1=2.0, m2=0.0, m3=0.0), lambda t: math.cos(2 * t)),
    (dict(m1=1.0, m2=0.3, m3=0.2), lambda t: math.cos(t + 0.3) - 0.2),
])
def test_target_and_other_logits(margins, expected):
    loss = build(s=2.0, **margins)
    thetas = [0.3, 1.0, 1.4]  # m1 * theta + m2 stays below pi
    cos = torch.tensor([[math.cos(t), 0.1, -0.2] for t in thetas],
                       dtype=torch.float64)
    labels = torch.tensor([0, 0, -1])
    out = loss(cos, labels)
    for row, theta in enumerate(thetas[:2]):
        assert out[row, 0].item() == pytest.approx(2.0 * expected(theta),
                                                   abs=1e-9)
    # non-target entries and rows without a local target: only scaled
    assert torch.equal(out[:, 1:], 2.0 * cos[:, 1:])
    assert torch.equal(out[2], 2.0 * cos[2])


@pytest.mark.parametrize('margins', [
    dict(m1=1.0, m2=0.5, m3=0.0), dict(m1=1.0, m2=0.0, m3=0.35),
    dict(m1=1.35, m2=0.25, m3=0.1), dict(m1=4.0, m2=0.0, m3=0.0)])
def test_exact_gradient(margins):
    loss = build(s=3.0, **margins)
    cos = (torch.rand(5, 4, dtype=torch.float64) * 1.8 - 0.9)
    cos.requires_grad_(True)
    labels = torch.tensor([0, 3, -1, 1, 2])
    assert torch.autograd.gradcheck(lambda c: loss(c, labels), (cos, ))


@pytest.mark.parametrize('margins', [dict(m2=0.5), dict(m1=1.35, m2=0.25),
                                     dict(m1=4.0, m2=0.0), dict(m2=1.2)])
def test_target_logit_monotonic_beyond_pi(margins):
    loss = build(**margins)
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    target = loss.target_logit(torch.cos(theta))
    steps = target[1:] - target[:-1]
    assert (steps < 0).all(), 'target logit must fall as theta grows'
    # exact cos(theta + m) where theta + m <= pi
    m1, m2 = margins.get('m1', 1.0), margins['m2']
    inside = (m1 * theta + m2 <= math.pi) & (theta > 1e-3)
    assert torch.allclose(target[inside], torch.cos(m1 * theta + m2)[inside],
                          atol=1e-6)


def test_interclass_filtering_zeroes_and_stops_gradient():
    loss = build(s=1.0, m2=0.0, interclass_filtering_threshold=0.5)
    cos = torch.tensor([[0.9, 0.7, 0.2], [0.6, 0.1, 0.8]], requires_grad=True)
    out = loss(cos, torch.tensor([0, 2]))
    expected = torch.tensor([[0.9, 0.0, 0.2], [0.0, 0.1, 0.8]])
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert torch.equal(cos.grad, torch.tensor([[1.0, 0.0, 1.0],
                                               [0.0, 1.0, 1.0]]))


@pytest.mark.parametrize('bad, bound', [
    (dict(s=0.0), '> 0'), (dict(m1=0.5), '>= 1'), (dict(m2=-0.1), '[0, pi)'),
    (dict(interclass_filtering_threshold=1.5), '[0, 1)')])
def test_bad_values_raise(bad, bound):
    (key, value), = bad.items()
    with pytest.raises(ValueError) as err:
        build(**bad)
    assert_mentions(err, 'CombinedMarginLoss', key, bound, f'got {value!r}')


def test_distributed_cross_entropy_single_rank_matches_torch():
    logits = torch.randn(6, 9, dtype=torch.float64) * 10
    labels = torch.tensor([0, 8, 3, 3, 5, 1])
    ours = logits.clone().requires_grad_(True)
    ref = logits.clone().requires_grad_(True)
    loss = distributed_cross_entropy(ours, labels)
    expected = F.cross_entropy(ref, labels)
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(ours.grad, ref.grad, atol=1e-12)
