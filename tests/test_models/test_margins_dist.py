"""Every margin on 1, 2 and 3 gloo ranks against the float64 dense reference.

One spawn per world size runs, for every margin of ``test_margins.MARGINS``,
three steps of ``PartialFCHead`` with 23 classes (uneven shards) in model
parallel and at sample rate 0.1 (against the dense computation over the
sampled columns of every rank), and checks that the running statistics and
ElasticFace's draws are identical on every rank. The same spawn checks the
replicated head's statistics (all-reduced over the ranks' local batches) and
the plain ``distributed_cross_entropy`` on a row whose loss exceeds 69.
"""
import math

import pytest
import torch
from dist_utils import run_distributed
from margin_references import (BATCH, DIM, MARGINS, NUM_CLASSES, START, STEPS,
                               batch, check_state, head_step, reference,
                               rel_err)

RATES = (1.0, 0.1)


def step_batch(step, world_size):
    return batch(step, world_size * BATCH, seed=world_size)


def sharded_steps(rank, world_size, name, rate):
    from mmpfc.registry import MODELS
    head = MODELS.build(dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                             in_channels=DIM, sample_rate=rate,
                             loss=MARGINS[name], seed=3)).double()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    steps = []
    for step in range(STEPS):
        emb, labels = step_batch(step, world_size)
        before = head.weight.detach().clone()
        loss, feats_grad, index, wgrad = head_step(head, emb, labels, mine)
        margins = None
        if name.startswith('elastic'):
            margins = head.margin_loss.row_margins(
                torch.zeros(world_size * BATCH, dtype=torch.float64))
        steps.append(dict(
            loss=loss.item(), feats_grad=feats_grad, weight=before,
            index=index, wgrad=wgrad.clone(), margins=margins,
            buffers={k: v.clone()
                     for k, v in head.margin_loss.state_dict().items()}))
    return dict(steps=steps, shard=(head.class_start, head.num_local))


def replicated_step(rank, world_size, name):
    """One step of the replicated head on this rank's own rows."""
    from mmpfc.registry import MODELS
    head = MODELS.build(dict(type='MarginSoftmaxHead',
                             num_classes=NUM_CLASSES, in_channels=DIM,
                             loss=MARGINS[name], seed=3)).double()
    emb, labels = step_batch(0, world_size)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    head.loss_by_labels(emb[mine], labels[mine])
    margin = head.margin_loss
    out = {k: v.clone() for k, v in margin.state_dict().items()}
    if name.startswith('elastic'):
        out['margins'] = margin.row_margins(torch.zeros(BATCH,
                                                        dtype=torch.float64))
    return out


def plain_cross_entropy(rank, world_size):
    """``distributed_cross_entropy`` with the columns split over ranks."""
    from mmpfc.models.utils import distributed_cross_entropy, shard_range
    logits, labels = big_loss_logits()
    start, count = shard_range(logits.shape[1], rank, world_size)
    local = labels - start
    local = torch.where((local >= 0) & (local < count), local,
                        torch.full_like(local, -1))
    mine = logits[:, start:start + count].clone().requires_grad_(True)
    loss = distributed_cross_entropy(mine, local)
    loss.backward()
    return dict(loss=loss.item(), grad=mine.grad, start=start)


def big_loss_logits():
    logits = torch.tensor([[0.0, 95.0, -4.0, 3.0, 110.0, 1.0, 2.0],
                           [1.0, 0.5, 2.0, -1.0, 0.0, 0.2, 0.1]])
    return logits, torch.tensor([0, 2])


def unseeded_elastic(rank, world_size):
    """ElasticFace built with a different torch seed on every rank: the
    first draw broadcasts rank 0's seed, so the margins still agree."""
    from mmpfc.registry import MODELS
    torch.manual_seed(100 + rank)
    head = MODELS.build(dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                             in_channels=DIM, loss=dict(
                                 type='ElasticFaceLoss', std=0.1)))
    emb, labels = step_batch(0, world_size)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    head.loss_by_labels(emb[mine].float(), labels[mine])
    return head.margin_loss.row_margins(torch.zeros(world_size * BATCH))


def worker(rank, world_size):
    import mmpfc  # noqa: F401
    out = {'sharded': {(name, rate): sharded_steps(rank, world_size, name,
                                                   rate)
                       for name in MARGINS for rate in RATES}}
    out['replicated'] = {name: replicated_step(rank, world_size, name)
                         for name in ('curricular', 'adaface',
                                      'elastic_arc')}
    out['plain'] = plain_cross_entropy(rank, world_size)
    out['unseeded'] = unseeded_elastic(rank, world_size)
    return out


def check_sharded(name, rate, ranks, world_size):
    """Loss, gradients and statistics of every step against the reference;
    returns the worst relative errors (loss, features, centers)."""
    cfg, state = MARGINS[name], START.get(name, {})
    worst = [0.0, 0.0, 0.0]
    starts = [r['shard'][0] for r in ranks]
    sizes = [r['shard'][1] for r in ranks]
    assert sum(sizes) == NUM_CLASSES and len(set(sizes)) == (
        1 if NUM_CLASSES % world_size == 0 else 2)
    for step in range(STEPS):
        emb, labels = step_batch(step, world_size)
        steps = [r['steps'][step] for r in ranks]
        # the used columns of every rank, in rank order
        cols, weights = [], []
        for start, size, s in zip(starts, sizes, steps):
            index = torch.arange(size) if s['index'] is None else s['index']
            if rate < 1:
                positives = {int(c) - start for c in labels
                             if start <= c < start + size}
                assert positives <= set(index.tolist())
            cols += [start + int(i) for i in index]
            weights.append(s['weight'][index])
        column_of = {c: pos for pos, c in enumerate(cols)}
        sub_labels = torch.tensor([column_of[int(c)] for c in labels])
        margins = steps[0]['margins']
        for s in steps[1:]:  # every rank drew the same margins
            assert margins is None or torch.equal(s['margins'], margins)
        ref_loss, ref_e, ref_w, state = reference(
            name, cfg, torch.cat(weights), emb, sub_labels, state, margins)
        for s in steps:  # the same global loss on every rank
            worst[0] = max(worst[0], abs(s['loss'] / ref_loss.item() - 1))
        feats_grad = torch.cat([s['feats_grad'] for s in steps])
        worst[1] = max(worst[1], rel_err(feats_grad, world_size * ref_e))
        wgrad = torch.cat([s['wgrad'] for s in steps])
        worst[2] = max(worst[2], rel_err(wgrad, ref_w))
        # running statistics: identical on every rank, equal to the
        # reference's
        for s in steps[1:]:
            for key, value in steps[0]['buffers'].items():
                assert torch.equal(s['buffers'][key], value), (name, key)
        check_state(name, _Buffers(steps[0]['buffers']), state)
    return worst


class _Buffers:
    """A margin's saved buffers seen as attributes (for ``check_state``)."""

    def __init__(self, buffers):
        self.__dict__.update(buffers)


def check_replicated(per_rank, world_size, sharded_margins):
    """The replicated head's statistics come from the global batch, and
    rank r's rows draw the margins the sharded head draws for them."""
    emb, labels = step_batch(0, world_size)
    norms = emb.norm(dim=1).clip(0.001, 100)
    ada = MARGINS['adaface']
    alpha = ada['t_alpha']
    for r in per_rank:
        got = r['adaface']
        assert got['batch_mean'].item() == pytest.approx(
            alpha * norms.mean().item() + (1 - alpha) * 20.0, rel=1e-12)
        assert got['batch_std'].item() == pytest.approx(
            alpha * norms.std().item() + (1 - alpha) * 100.0, rel=1e-12)
        assert torch.equal(got['batch_mean'],
                           per_rank[0]['adaface']['batch_mean'])
        assert torch.equal(r['curricular']['t'],
                           per_rank[0]['curricular']['t'])
    local = torch.cat([r['elastic_arc']['margins'] for r in per_rank])
    assert torch.equal(local, sharded_margins)
    assert local.unique().numel() == world_size * BATCH


def check_plain(per_rank):
    logits, labels = big_loss_logits()
    ref = logits.double().requires_grad_(True)
    expected = torch.nn.functional.cross_entropy(ref, labels)
    expected.backward()
    row0 = torch.logsumexp(logits[0].double(), 0) - logits[0, 0]
    assert row0 > 69
    for r in per_rank:
        assert r['loss'] == pytest.approx(expected.item(), rel=1e-6)
    grad = torch.cat([r['grad'] for r in per_rank], dim=1)
    assert torch.allclose(grad.double(), ref.grad, atol=1e-7)


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_margins_on_ranks_match_dense_reference(world_size):
    per_rank = run_distributed(worker, world_size)
    for name in MARGINS:
        for rate in RATES:
            ranks = [r['sharded'][(name, rate)] for r in per_rank]
            errors = check_sharded(name, rate, ranks, world_size)
            print(f'W={world_size} rate={rate} {name}: max rel err loss '
                  f'{errors[0]:.1e}, feature grad {errors[1]:.1e}, center '
                  f'grad {errors[2]:.1e}')
            assert max(errors) < 1e-9, (name, rate, errors)
    check_replicated([r['replicated'] for r in per_rank], world_size,
                     per_rank[0]['sharded'][('elastic_arc', 1.0)]['steps'][0]
                     ['margins'])
    check_plain([r['plain'] for r in per_rank])
    for r in per_rank[1:]:
        assert torch.equal(r['unseeded'], per_rank[0]['unseeded'])
    assert not math.isnan(per_rank[0]['plain']['loss'])
