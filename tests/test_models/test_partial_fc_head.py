"""PartialFCHead on 1, 2 and 3 gloo ranks against a dense single-process model.

Every rank builds its shard; the test concatenates the shards into the full
(C, D) matrix and recomputes loss and gradients densely in float64 with plain
torch ops (one-hot, arccos, F.cross_entropy), independent of mmpfc's code.
"""
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from helpers import drawn_rows
from messages import assert_mentions

NUM_CLASSES = 11  # not divisible by 2 or 3: uneven shards
DIM = 8
BATCH = 4
MARGINS = {
    'arcface': dict(type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.5, m3=0.0),
    'cosface': dict(type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.0,
                    m3=0.4),
}
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


def global_batch(world_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(world_size * BATCH, DIM, generator=gen,
                      dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (world_size * BATCH, ),
                           generator=gen)
    return emb, labels


def data_samples(labels):
    from mmpretrain.structures import DataSample
    return [DataSample().set_gt_label(int(lab)) for lab in labels]


def dense_reference(weight, emb, labels, margin):
    """Loss and gradients of the full model, written without mmpfc."""
    w = weight.clone().double().requires_grad_(True)
    e = emb.clone().double().requires_grad_(True)
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()
    onehot = F.one_hot(labels, w.shape[0]).bool()
    theta = torch.acos(cos.clamp(-1 + 1e-12, 1 - 1e-12))
    target = torch.cos(margin['m1'] * theta + margin['m2']) - margin['m3']
    logits = torch.where(onehot, target, cos) * margin['s']
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), e.grad, w.grad


def exactness_worker(rank, world_size):
    import mmpfc  # noqa: F401
    from mmpfc.registry import MODELS
    emb, labels = global_batch(world_size)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    results = {}
    for name, margin in MARGINS.items():
        head = MODELS.build(dict(type='PartialFCHead',
                                 num_classes=NUM_CLASSES, in_channels=DIM,
                                 loss=margin, seed=3)).double()
        feats = emb[mine].clone().requires_grad_(True)
        loss = head.loss((feats, ), data_samples(labels[mine]))['loss']
        loss.backward()
        results[name] = dict(loss=loss.item(), feats_grad=feats.grad,
                             weight=head.weight.detach().clone(),
                             weight_grad=head.weight.grad,
                             shard=(head.class_start, head.num_local))
    return results


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_loss_and_gradients_match_dense_model(world_size):
    per_rank = run_distributed(exactness_worker, world_size)
    emb, labels = global_batch(world_size)
    for name, margin in MARGINS.items():
        ranks = [r[name] for r in per_rank]
        starts = [r['shard'][0] for r in ranks]
        sizes = [r['shard'][1] for r in ranks]
        base = NUM_CLASSES // world_size
        assert sizes == [base + (r < NUM_CLASSES % world_size)
                         for r in range(world_size)]
        assert starts == [sum(sizes[:r]) for r in range(world_size)]
        weight = torch.cat([r['weight'] for r in ranks])
        loss, emb_grad, weight_grad = dense_reference(weight, emb, labels,
                                                      margin)
        for r in ranks:  # the same global loss on every rank
            assert r['loss'] == pytest.approx(loss.item(), rel=1e-5)
        feats_grad = torch.cat([r['feats_grad'] for r in ranks])
        err = (feats_grad - world_size * emb_grad).abs().max().item()
        assert err < 1e-5 * emb_grad.abs().max().item() * world_size, name
        got_wgrad = torch.cat([r['weight_grad'] for r in ranks])
        assert torch.allclose(got_wgrad, weight_grad, rtol=1e-5,
                              atol=1e-7), name
        print(f'W={world_size} {name}: loss err '
              f'{abs(ranks[0]["loss"] - loss.item()):.2e}, feats grad max '
              f'err {err:.2e}')


def sampling_worker(rank, world_size, sample_rate):
    import mmpfc  # noqa: F401
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.registry import MODELS
    emb, labels = global_batch(world_size, seed=1)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    head = MODELS.build(dict(type='PartialFCHead', num_classes=NUM_CLASSES,
                             in_channels=DIM, sample_rate=sample_rate,
                             loss=MARGINS['cosface'], seed=5)).double()
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD(head.parameters(), **SGD))
    drawn = drawn_rows(head)
    steps = []
    for step in range(2):
        before = head.weight.detach().clone()
        feats = emb[mine].clone().requires_grad_(True)
        loss = head.loss((feats, ), data_samples(labels[mine]))['loss']
        index = drawn[step]
        wrapper.update_params(loss)
        momentum = wrapper.optimizer.state[head.weight]['momentum_buffer']
        steps.append(dict(before=before, after=head.weight.detach().clone(),
                          index=index, momentum=momentum.clone(),
                          grad_is_none=head.weight.grad is None))
    return dict(steps=steps, shard=(head.class_start, head.num_local))


@pytest.mark.parametrize('world_size,sample_rate', [(1, 0.4), (2, 0.4),
                                                    (3, 0.0)])
def test_sampled_step_updates_only_sampled_rows(world_size, sample_rate):
    per_rank = run_distributed(sampling_worker, world_size, sample_rate)
    emb, labels = global_batch(world_size, seed=1)
    lr, mom, wd = SGD['lr'], SGD['momentum'], SGD['weight_decay']
    first = [r['steps'][0] for r in per_rank]
    # every positive kept; count = max(int(p * num_local), #positives)
    sub_weights, col_of_class, offset = [], {}, 0
    for r, step in zip(per_rank, first):
        start, num_local = r['shard']
        index = step['index']
        positives = {int(c) - start for c in labels
                     if start <= c < start + num_local}
        assert positives <= set(index.tolist())
        assert len(index) == max(int(sample_rate * num_local), len(positives))
        assert torch.equal(index, index.sort()[0])
        for pos, row in enumerate(index.tolist()):
            col_of_class[start + row] = offset + pos
        offset += len(index)
        sub_weights.append(step['before'][index])
    # dense reference over the sampled columns only
    sub_labels = torch.tensor([col_of_class[int(c)] for c in labels])
    _, _, sub_grad = dense_reference(torch.cat(sub_weights), emb, sub_labels,
                                     dict(s=16.0, m1=1.0, m2=0.0, m3=0.4))
    grads = sub_grad.split([len(s['index']) for s in first])
    for step, grad in zip(first, grads):
        index = step['index']
        unsampled = torch.ones(len(step['before']), dtype=torch.bool)
        unsampled[index] = False
        assert step['grad_is_none'], 'no full-shard gradient expected'
        assert torch.equal(step['after'][unsampled],
                           step['before'][unsampled])
        assert not step['momentum'][unsampled].any()
        expected_buf = grad + wd * step['before'][index]
        assert torch.allclose(step['momentum'][index], expected_buf,
                              rtol=1e-6, atol=1e-9)
        expected = step['before'][index] - lr * expected_buf
        assert torch.allclose(step['after'][index], expected, rtol=1e-6,
                              atol=1e-9)
    # second step: momentum of rows unsampled then stays bit-identical
    for r in per_rank:
        s1, s2 = r['steps']
        unsampled = torch.ones(len(s1['after']), dtype=torch.bool)
        unsampled[s2['index']] = False
        assert torch.equal(s2['momentum'][unsampled],
                           s1['momentum'][unsampled])
        assert torch.equal(s2['after'][unsampled], s1['after'][unsampled])
        assert not torch.equal(s2['momentum'][s2['index']],
                               mom * s1['momentum'][s2['index']])


def bad_input_worker(rank, world_size):
    import mmpfc  # noqa: F401
    from mmpfc.models.heads import PartialFCHead
    errors = {}
    try:
        PartialFCHead(num_classes=1, in_channels=DIM)
    except ValueError as err:
        errors['few_classes'] = str(err)
    head = PartialFCHead(num_classes=NUM_CLASSES, in_channels=DIM)
    batch = 3 if rank == 0 else 2
    try:
        head.loss_by_labels(torch.randn(batch, DIM),
                            torch.zeros(batch, dtype=torch.long))
    except ValueError as err:
        errors['batch'] = str(err)
    return errors


def test_bad_input_across_ranks():
    for errors in run_distributed(bad_input_worker, 2):
        assert 'num_classes=1' in errors['few_classes']
        assert 'world size 2' in errors['few_classes']
        assert '[3, 2]' in errors['batch']


@pytest.mark.parametrize('kwargs,feats,labels,named', [
    (dict(sample_rate=1.5), None, None, ('sample_rate', '[0, 1]', 'got 1.5')),
    (dict(sample_rate=-0.1), None, None,
     ('sample_rate', '[0, 1]', 'got -0.1')),
    ({}, torch.randn(2, DIM + 1), torch.tensor([0, 1]), ('(B, 8)', '(2, 9)')),
    ({}, torch.randn(2, DIM), torch.tensor([0, NUM_CLASSES]),
     ('[0, 11)', '[11]', 'num_classes=11')),
    ({}, torch.randn(2, DIM), torch.tensor([-1, 0]), ('[0, 11)', '[-1]')),
    ({}, torch.randn(2, DIM), torch.tensor([0]),
     ('1 labels', '2 embeddings')),
])
def test_bad_input_single_rank(kwargs, feats, labels, named):
    import mmpfc  # noqa: F401
    from mmpfc.models.heads import PartialFCHead
    with pytest.raises(ValueError) as err:
        head = PartialFCHead(num_classes=NUM_CLASSES, in_channels=DIM,
                             **kwargs)
        head.loss_by_labels(feats, labels)
    assert_mentions(err, *named)


def test_predict_returns_normalized_embeddings():
    import mmpfc  # noqa: F401
    from mmpfc.models.heads import PartialFCHead
    head = PartialFCHead(num_classes=NUM_CLASSES, in_channels=DIM)
    feats = torch.randn(3, DIM) * 5
    samples = head.predict((feats, ))
    for sample, row in zip(samples, feats):
        assert torch.allclose(sample.pred_feat, row / row.norm(), atol=1e-6)
        assert torch.equal(sample.raw_feat, row)


def test_replicated_head_matches_dense_model():
    import mmpfc  # noqa: F401
    from mmpfc.registry import MODELS
    emb, labels = global_batch(1)
    head = MODELS.build(dict(type='MarginSoftmaxHead',
                             num_classes=NUM_CLASSES, in_channels=DIM,
                             loss=MARGINS['arcface'])).double()
    feats = emb.clone().requires_grad_(True)
    loss = head.loss((feats, ), data_samples(labels))['loss']
    loss.backward()
    ref_loss, ref_grad, ref_wgrad = dense_reference(
        head.weight.detach(), emb, labels, MARGINS['arcface'])
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)
    assert torch.allclose(feats.grad, ref_grad, atol=1e-12)
    assert torch.allclose(head.weight.grad, ref_wgrad, atol=1e-12)


def test_copies_of_a_replicated_head_stay_replicated():
    """A data-parallel head's weight is never marked sharded, not even in
    a deepcopy (e.g. EMA) or a pickled copy; a sharded head's copy owns its
    own shard."""
    import copy
    import pickle

    import mmpfc  # noqa: F401
    from mmpfc.models.heads import (MarginSoftmaxHead, PartialFCHead,
                                    ShardedHead)
    from mmpfc.models.utils import is_sharded, sharded_names, sharded_owner
    replicated = MarginSoftmaxHead(NUM_CLASSES, DIM)
    sharded = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.5)
    for twin in (copy.deepcopy(replicated),
                 pickle.loads(pickle.dumps(replicated))):
        assert not is_sharded(twin.weight) and sharded_names(twin) == []
        assert not isinstance(twin, ShardedHead)
        assert torch.equal(twin.weight, replicated.weight)
    for twin in (copy.deepcopy(sharded), pickle.loads(pickle.dumps(sharded))):
        assert sharded_names(twin) == ['weight']
        assert sharded_owner(twin.weight) is twin
        assert isinstance(twin, ShardedHead)
    assert sharded_owner(sharded.weight) is sharded


@pytest.mark.parametrize('kwargs, named', [
    (dict(num_classes=0, in_channels=DIM), ('num_classes', '>= 1', 'got 0')),
    (dict(num_classes=4, in_channels=0), ('in_channels', '>= 1', 'got 0')),
])
def test_both_heads_check_their_arguments(kwargs, named):
    import mmpfc  # noqa: F401
    from mmpfc.registry import MODELS
    for head in ('PartialFCHead', 'MarginSoftmaxHead'):
        with pytest.raises(ValueError) as err:
            MODELS.build(dict(type=head, **kwargs))
        assert_mentions(err, head, *named)
