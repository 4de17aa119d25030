"""Sub-center ArcFace on the sharded, sampled head against float64 dense
computations written here.

The reference (:func:`reference`) normalizes every sub-center and embedding,
takes the largest of a class's K cosines with ``max`` (so autograd sends the
gradient to the arg-max sub-center), applies the margin to that class
cosine, a softmax cross-entropy, and differentiates in float64; it never
calls mmpfc. ``PartialFCHead(num_subcenters=K)`` is compared with it in one
process (chunks, both orders of the in-place gradient, clamped cosines, the
bit-mask path) and on 1, 2 and 3 gloo ranks (23 classes: uneven shards), in
model parallel and at sample rate 0.1 (dense over the sampled classes of
every rank), with one spawn per world size. A short training run shows the
loss falls and that a checkpoint re-splits by class id.
"""
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from margin_references import curricular_face, head_step

import mmpfc  # noqa: F401
from mmpfc.models.heads import PartialFCHead
from mmpfc.models.losses import CombinedMarginLoss
from mmpfc.registry import MODELS

NUM_CLASSES, DIM, K, BATCH, STEPS = 23, 8, 3, 4, 2
RATES = (1.0, 0.1)
ARC = dict(type='CombinedMarginLoss', s=64.0, m1=1.0, m2=0.5, m3=0.0)
CURRICULAR = dict(type='CurricularFaceLoss', s=32.0, m=0.5, t_alpha=0.3)


class PlainArcFace(CombinedMarginLoss):
    """ArcFace through the plain composition (it overrides ``forward``)."""

    def forward(self, cos, labels):
        return super().forward(cos, labels)


#: name -> (margin config or class, fused step or plain composition)
MARGINS = {'arcface': ARC, 'curricular': CURRICULAR, 'plain_arcface': None}


def build_margin(name):
    if name == 'plain_arcface':
        return PlainArcFace(s=64.0, m2=0.5)
    return dict(MARGINS[name])


# ------------------------------------------------------------ the reference
def reference(name, weight, emb, labels, state):
    """Loss, d loss / d emb, d loss / d weight (C, K*D), the class arg-max
    sub-centers and the new running state, float64, dense."""
    classes = weight.shape[0]
    w = weight.detach().double().clone().requires_grad_(True)
    e = emb.detach().double().clone().requires_grad_(True)
    sub = F.normalize(w.view(classes, K, DIM), dim=2)
    cos_k = torch.einsum('nd,ckd->nck', F.normalize(e, dim=1), sub)
    cos, which = cos_k.max(dim=2)
    cos = cos.clamp(-1, 1)
    onehot = F.one_hot(labels, classes).bool()
    cos_t = cos[onehot]
    theta = torch.acos(cos_t)
    state = dict(state)
    if name == 'curricular':
        target, other, state['t'] = curricular_face(
            cos, cos_t, state['t'], CURRICULAR['m'], CURRICULAR['t_alpha'])
        s = CURRICULAR['s']
    else:
        target, other, s = torch.cos(theta + 0.5), cos, 64.0
    logits = torch.where(onehot, target[:, None], other) * s
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), e.grad, w.grad, which, state


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(
        1e-300)).item()


def batch(step, rows, seed=0):
    gen = torch.Generator().manual_seed(100 * seed + step)
    emb = torch.randn(rows, DIM, generator=gen, dtype=torch.float64)
    emb = emb * (1 + 9 * torch.rand(rows, 1, generator=gen,
                                    dtype=torch.float64))
    labels = torch.randint(0, NUM_CLASSES, (rows, ), generator=gen)
    return emb, labels


def run_steps(head, steps, world_size, rank, rows_per_rank):
    """Loss and gradients of ``steps`` steps; the weight is not updated."""
    out = []
    mine = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
    for emb, labels in steps:
        loss, feats_grad, index, wgrad = head_step(head, emb, labels, mine)
        out.append(dict(loss=loss.item(), feats_grad=feats_grad,
                        index=index, wgrad=wgrad.clone()))
    return out


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize('value', [0, -1, 256, 2.0, '3', True, None])
def test_bad_num_subcenters_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match='num_subcenters') as err:
        PartialFCHead(NUM_CLASSES, DIM, num_subcenters=value)
    assert repr(value) in str(err.value)


def test_layout_and_k1_default():
    """(num_local, K*D) rows; K=1 is the default head, bit for bit."""
    head = PartialFCHead(NUM_CLASSES, DIM, num_subcenters=K, seed=2)
    assert head.weight.shape == (NUM_CLASSES, K * DIM)
    assert 'num_subcenters=3' in repr(head)
    assert PartialFCHead(NUM_CLASSES, DIM, num_subcenters=255,
                         seed=2).weight.shape == (NUM_CLASSES, 255 * DIM)
    one, plain = (PartialFCHead(NUM_CLASSES, DIM, seed=2, **kw).double()
                  for kw in (dict(num_subcenters=1), {}))
    assert torch.equal(one.weight, plain.weight)
    emb, labels = batch(0, 6)
    results = []
    for h in (one, plain):
        feats = emb.clone().requires_grad_(True)
        loss = h.loss_by_labels(feats, labels)
        loss.backward()
        results.append((loss.detach(), feats.grad, h.weight.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # embeddings stay D wide: K*D wide ones are refused
    with pytest.raises(ValueError, match=r'\(B, 8\)'):
        head.loss_by_labels(torch.randn(2, K * DIM), torch.tensor([0, 1]))
    # predict gives the embedding, unchanged
    feats = torch.randn(2, DIM)
    sample = head.predict(feats)[0]
    assert torch.allclose(sample.pred_feat, F.normalize(feats, dim=1)[0])


def test_fused_op_refuses_a_width_that_is_not_k_sub_centers():
    from mmpfc.models.heads.fused_margin_softmax import fused_margin_softmax
    with pytest.raises(ValueError, match=r'\(5, 20\).*3 sub-center'):
        fused_margin_softmax(torch.randn(2, DIM), torch.randn(5, 20), None,
                             torch.tensor([0, 1]), CombinedMarginLoss(),
                             num_subcenters=3)


# ------------------------------------------------------ one process, paths
@pytest.mark.parametrize('rows', [6, 30])  # N <= K*D and N > K*D
@pytest.mark.parametrize('bit_mask', [False, True])
def test_one_process_paths_match_dense_reference(rows, bit_mask,
                                                 monkeypatch):
    """Every margin path, one and several chunks, both orders of writing
    the (S, K*D) gradient over the (S, N) logits, a clamped class cosine
    (no gradient), with and without the bit mask of clamped positions."""
    from mmpfc.models.heads import bit_mask as bits
    from mmpfc.models.utils.chunks import CHUNK_BYTES
    monkeypatch.setitem(bits.BIT_MASK_CLAMP, 'cpu', bit_mask)
    monkeypatch.setattr(bits, 'MASK_BLOCK', 16)
    emb, labels = batch(7, rows)
    worst = 0.0
    for chunk_bytes in (2**20, 300):
        monkeypatch.setitem(CHUNK_BYTES, 'cpu', chunk_bytes)
        for name in MARGINS:
            head = PartialFCHead(NUM_CLASSES, DIM, num_subcenters=K,
                                 loss=build_margin(name), seed=5).double()
            with torch.no_grad():  # sub-center 1 of class 4 = embedding 0
                head.weight[4, DIM:2 * DIM] = 3.0 * emb[0]
            labels[1] = 4
            state = dict(t=0.0)
            for step in run_steps(head, [(emb, labels)], 1, 0, rows):
                ref_loss, ref_e, ref_w, which, state = reference(
                    name, head.weight, emb, labels, state)
                assert step['loss'] == pytest.approx(ref_loss.item(),
                                                     rel=1e-12)
                worst = max(worst, rel_err(step['feats_grad'], ref_e),
                            rel_err(step['wgrad'], ref_w))
                assert set(which.flatten().tolist()) == set(range(K))
                # only the arg-max sub-centers get a gradient
                got = step['wgrad'].view(NUM_CLASSES, K, DIM)
                used = torch.zeros(NUM_CLASSES, K, dtype=torch.bool)
                used[torch.arange(NUM_CLASSES)[None, :].expand_as(which),
                     which] = True
                assert torch.count_nonzero(got[~used]) == 0
                assert (~used).any() or rows > NUM_CLASSES
                assert got[used].abs().sum(dim=1).gt(0).sum() > rows
    assert worst < 1e-9, worst


# ---------------------------------------------------- 1, 2 and 3 ranks
def sharded_worker(rank, world_size):
    out = {}
    steps = [batch(step, world_size * BATCH, seed=world_size)
             for step in range(STEPS)]
    for name in MARGINS:
        for rate in RATES:
            head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=rate,
                                 num_subcenters=K, loss=build_margin(name),
                                 seed=3).double()
            weight = head.weight.detach().clone()
            out[(name, rate)] = dict(
                steps=run_steps(head, steps, world_size, rank, BATCH),
                weight=weight, shard=(head.class_start, head.num_local))
    return out


def check_sharded(name, rate, ranks, world_size):
    """Every step against the dense reference over the used classes of
    every rank; the worst relative errors (loss, features, centers)."""
    worst, state = [0.0, 0.0, 0.0], dict(t=0.0)
    starts = [r['shard'][0] for r in ranks]
    sizes = [r['shard'][1] for r in ranks]
    assert sum(sizes) == NUM_CLASSES and len(set(sizes)) == (
        1 if NUM_CLASSES % world_size == 0 else 2)
    for step in range(STEPS):
        emb, labels = batch(step, world_size * BATCH, seed=world_size)
        per_rank = [r['steps'][step] for r in ranks]
        cols, weights = [], []
        for start, size, r, s in zip(starts, sizes, ranks, per_rank):
            index = torch.arange(size) if s['index'] is None else s['index']
            if rate < 1:  # every positive kept, fewer classes than all
                positives = {int(c) - start for c in labels
                             if start <= c < start + size}
                assert positives <= set(index.tolist())
            cols += [start + int(i) for i in index]
            weights.append(r['weight'][index])
        if rate < 1:
            assert len(cols) < NUM_CLASSES
        column_of = {c: pos for pos, c in enumerate(cols)}
        sub_labels = torch.tensor([column_of[int(c)] for c in labels])
        ref_loss, ref_e, ref_w, _, state = reference(
            name, torch.cat(weights), emb, sub_labels, state)
        for s in per_rank:
            worst[0] = max(worst[0], abs(s['loss'] / ref_loss.item() - 1))
        feats_grad = torch.cat([s['feats_grad'] for s in per_rank])
        worst[1] = max(worst[1], rel_err(feats_grad, world_size * ref_e))
        wgrad = torch.cat([s['wgrad'] for s in per_rank])
        assert wgrad.shape == (len(cols), K * DIM)
        worst[2] = max(worst[2], rel_err(wgrad, ref_w))
    return worst


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_subcenters_on_ranks_match_dense_reference(world_size):
    per_rank = run_distributed(sharded_worker, world_size)
    for name in MARGINS:
        for rate in RATES:
            errors = check_sharded(name, rate,
                                   [r[(name, rate)] for r in per_rank],
                                   world_size)
            print(f'W={world_size} K={K} rate={rate} {name}: max rel err '
                  f'loss {errors[0]:.1e}, feature grad {errors[1]:.1e}, '
                  f'center grad {errors[2]:.1e}')
            assert max(errors) < 1e-9, (name, rate, errors)


# ------------------------------------- training, checkpoints, re-splitting
TRAIN = dict(max_iters=20, interval=10, sample_rate=0.5,
             center_dtype='bfloat16', center_state_dtype='int8')
TRAIN_DIM = 16


@MODELS.register_module(force=True)
class SubcenterToyNet(torch.nn.Module):
    """One linear map of the whole 32x32 image: learns the tiny faces in a
    few steps (LeNet-5 needs many more)."""

    def __init__(self, dim: int = TRAIN_DIM) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, dim, 32)

    def forward(self, inputs):
        return (self.conv(inputs), )


def subcenter_cfg(work_dir, world_size, **kwargs):
    """The tiny run of ``tests/tiny_training.py`` with K sub-centers,
    ArcFace (a small scale for 10 classes) and a linear backbone."""
    from tiny_training import make_cfg
    cfg = make_cfg(work_dir, world_size=world_size,
                   backbone=dict(type='SubcenterToyNet'), dim=TRAIN_DIM,
                   **kwargs)
    cfg.model.head.update(
        num_subcenters=K,
        loss=dict(type='CombinedMarginLoss', s=16.0, m1=1.0, m2=0.3, m3=0.0))
    cfg.optim_wrapper.optimizer.lr = 0.05
    cfg.param_scheduler[-1].update(end=kwargs.get('max_iters', 20))
    return cfg


def train_worker(rank, world_size, work_dir, kwargs):
    from tiny_training import build_runner, head_state
    runner = build_runner(subcenter_cfg(work_dir, world_size, **kwargs))
    runner.train()
    losses = runner.message_hub.get_scalar('train/loss').data[0]
    return dict(start=runner.captured, final=head_state(runner),
                losses=[float(v) for v in losses])


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('subcenter'))
    return work_dir, run_distributed(train_worker, 2, work_dir, TRAIN)


def test_training_lowers_the_loss(trained):
    _, ranks = trained
    losses = ranks[0]['losses']
    assert len(losses) == TRAIN['max_iters']
    assert losses == ranks[1]['losses']  # the global loss, on both ranks
    first, last = sum(losses[:4]) / 4, sum(losses[-5:]) / 5
    print(f'loss {first:.2f} -> {last:.2f}')
    assert last < 0.2 * first, losses
    for r in ranks:
        weight = r['final']['weight']
        assert weight.dtype == torch.bfloat16
        assert weight.shape[1] == K * TRAIN_DIM
        assert r['final']['optimizer_state']['momentum_buffer'].dtype == \
            torch.int8


def test_checkpoint_re_splits_by_class_and_merges(trained, tmp_path):
    """2 -> 3 ranks take the saved (C, K*D) rows and their int8 momentum by
    class id; a merge writes all C rows."""
    from tiny_training import NUM_CLASSES as CLASSES

    from mmpfc.checkpoint import CheckpointRows, load_file
    from mmpfc.checkpoint.merge import merge_checkpoint
    work_dir, ranks = trained
    ckpt = osp.join(work_dir, 'iter_20.pth')
    source = CheckpointRows(ckpt, load_file(ckpt))
    weight, rows, _ = source.take('head.weight', 0, CLASSES)
    assert weight.shape == (CLASSES, K * TRAIN_DIM)
    assert torch.equal(weight, torch.cat([r['final']['weight']
                                          for r in ranks]))
    three = run_distributed(train_worker, 3, str(tmp_path / 'w3'), dict(
        TRAIN, max_iters=21, load_from=ckpt, resume=True))
    assert [len(r['start']['weight']) for r in three] == [4, 3, 3]
    for r in three:
        start = r['start']['class_start']
        stop = start + len(r['start']['weight'])
        assert torch.equal(r['start']['weight'], weight[start:stop])
        for key in ('momentum_buffer', 'momentum_buffer_absmax'):
            assert torch.equal(r['start']['optimizer_state'][key],
                               rows[key][start:stop]), key
        assert r['final']['iter'] == 21
    merged = str(tmp_path / 'merged.pth')
    merge_checkpoint(ckpt, merged)
    full = load_file(merged)['state_dict']['head.weight']
    assert torch.equal(full, weight.float())


def test_k1_checkpoint_into_a_subcenter_model_names_the_shapes(tmp_path):
    """A K=1 checkpoint (e.g. converted from insightface, which has no
    sub-centers) does not load into a K=3 model: the error gives both
    widths."""
    from tiny_training import build_runner, make_cfg

    from mmpfc.checkpoint import CheckpointError
    plain = build_runner(make_cfg(
        tmp_path / 'k1', max_iters=1, dim=TRAIN_DIM,
        backbone=dict(type='SubcenterToyNet')))
    plain.train()
    ckpt = str(tmp_path / 'k1.pth')
    plain.save_checkpoint(str(tmp_path), 'k1.pth')
    model = build_runner(subcenter_cfg(tmp_path / 'k3', 1, max_iters=1))
    with pytest.raises(CheckpointError) as err:
        model.load_checkpoint(ckpt)
    message = str(err.value)
    print(message)
    assert "'head.weight'" in message
    assert f'embedding size {TRAIN_DIM}' in message
    assert f'embedding size {K * TRAIN_DIM}' in message
    assert 'another num_subcenters?' in message


# ------------------------------------------------------------- the configs
@pytest.mark.parametrize('name,base', [
    ('r50_subcenter_arcface_ms1mv3', 'r50_mp_ms1mv3'),
    ('mbf_subcenter_arcface_demo_cpu', 'mbf_pfc0.1_demo_cpu')])
def test_subcenter_configs(name, base):
    """The paper's head (K=3, ArcFace m=0.5, s=64) on the base's setup."""
    from helpers import ROOT
    from mmengine.config import Config
    path = osp.join(ROOT, 'configs', 'margins', f'{name}.py')
    with open(path) as f:
        assert f.readline().startswith('# ')
    cfg = Config.fromfile(path)
    ref = Config.fromfile(osp.join(ROOT, 'configs', 'pfc', f'{base}.py'))
    head = cfg.model.head
    assert head.num_subcenters == 3
    assert dict(head.loss) == dict(type='CombinedMarginLoss', s=64.0,
                                   m1=1.0, m2=0.5, m3=0.0)
    for key in ('num_classes', 'in_channels', 'sample_rate'):
        assert head[key] == ref.model.head[key], key
    assert cfg.train_cfg == ref.train_cfg
    built = MODELS.build(dict(head, num_classes=50))
    assert built.weight.shape == (50, 3 * head.in_channels)
    emb = torch.randn(6, head.in_channels)
    loss = built.loss_by_labels(emb, torch.arange(6))
    assert torch.isfinite(loss)
