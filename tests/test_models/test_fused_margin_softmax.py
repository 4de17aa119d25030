"""The fused margin softmax equals the plain composition it replaces.

``PartialFCHead`` computes its loss with ``fused_margin_softmax`` when the
margin is a stock ``CombinedMarginLoss``; any other margin module takes the
plain path (normalize, linear, margin, ``distributed_cross_entropy``). A
``CombinedMarginLoss`` subclass that only re-declares ``forward`` takes the
plain path with identical maths, so the two can be compared directly, on one
process and on two gloo ranks, in float64.
"""
import pytest
import torch
from dist_utils import run_distributed

import mmpfc  # noqa: F401
from mmpfc.models.heads.fused_margin_softmax import chunk_rows, supports_fused
from mmpfc.models.losses import CombinedMarginLoss
from mmpfc.models.utils.chunks import CHUNK_BYTES

NUM_CLASSES, DIM, BATCH = 37, 6, 5
MARGINS = {
    'arcface': dict(s=16.0, m2=0.5),
    'cosface': dict(s=16.0, m2=0.0, m3=0.4),
    'combined': dict(s=8.0, m1=1.3, m2=0.2, m3=0.1),
    'filtered': dict(s=16.0, m2=0.5, interclass_filtering_threshold=0.3),
}


class PlainMargin(CombinedMarginLoss):
    """Same maths, but not recognised as fusable."""

    def forward(self, cos, labels):
        return super().forward(cos, labels)


def run_head(margin_cls, margin, sample_rate, emb, labels, weight_init):
    from mmpfc.models.heads import PartialFCHead
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=sample_rate,
                         loss=margin_cls(**margin), seed=4).double()
    with torch.no_grad():
        head.weight.copy_(weight_init[head.class_start:head.class_start +
                                      head.num_local])
    feats = emb.clone().requires_grad_(True)
    loss = head.loss_by_labels(feats, labels)
    loss.backward()
    popped = head.pop_sampled_gradient()
    wgrad = head.weight.grad if popped is None else popped[1]
    return loss.item(), feats.grad, wgrad


def compare_worker(rank, world_size, sample_rate, chunk_bytes):
    with pytest.MonkeyPatch.context() as patch:  # restored on return
        patch.setitem(CHUNK_BYTES, 'cpu', chunk_bytes)  # several chunks
        return compare_margins(rank, world_size, sample_rate)


def compare_margins(rank, world_size, sample_rate):
    gen = torch.Generator().manual_seed(11)
    emb = torch.randn(world_size, BATCH, DIM, generator=gen,
                      dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (world_size, BATCH),
                           generator=gen)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen,
                         dtype=torch.float64)
    weight[3] = emb[0, 0] * 2.5  # a cosine of exactly 1 (clamped)
    out = {}
    for name, margin in MARGINS.items():
        assert supports_fused(CombinedMarginLoss(**margin))
        assert not supports_fused(PlainMargin(**margin))
        out[name] = [run_head(cls, margin, sample_rate, emb[rank],
                              labels[rank], weight)
                     for cls in (CombinedMarginLoss, PlainMargin)]
    return out


@pytest.mark.parametrize('world_size,sample_rate,chunk_bytes', [
    (1, 1.0, 64), (1, 0.5, 2**20), (2, 1.0, 200), (2, 0.4, 96)])
def test_fused_equals_plain(world_size, sample_rate, chunk_bytes):
    for per_rank in run_distributed(compare_worker, world_size, sample_rate,
                                    chunk_bytes):
        for name, (fused, plain) in per_rank.items():
            assert fused[0] == pytest.approx(plain[0], rel=1e-12), name
            for got, want in zip(fused[1:], plain[1:]):
                assert got.shape == want.shape, name
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-13), name


def test_chunk_rows_respects_budget():
    rows = chunk_rows(10**6, 512, torch.device('cpu'))
    assert rows * 512 * 4 <= CHUNK_BYTES['cpu']
    assert chunk_rows(3, 512, torch.device('cpu')) == 3
    assert chunk_rows(0, 512, torch.device('cpu')) == 1


@pytest.mark.parametrize('bit_mask_on_cpu,chunk_bytes', [
    (False, None), (True, None),
    (True, 96)])  # the mask in several chunks and blocks
def test_cosine_rounded_above_one_is_clamped_without_gradient(
        bit_mask_on_cpu, chunk_bytes, monkeypatch):
    """Like ``cos.clamp(-1, 1)``: no gradient where rounding exceeded 1;
    also with the clamped positions kept as a bit mask (CUDA's way)."""
    from mmpfc.models.heads import bit_mask
    from mmpfc.models.heads.fused_margin_softmax import fused_margin_softmax
    from mmpfc.models.utils import chunks
    monkeypatch.setitem(bit_mask.BIT_MASK_CLAMP, 'cpu', bit_mask_on_cpu)
    if chunk_bytes is not None:
        monkeypatch.setitem(chunks.CHUNK_BYTES, 'cpu', chunk_bytes)
        monkeypatch.setattr(bit_mask, 'MASK_BLOCK', 8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(1000):  # find a vector whose self-cosine rounds above 1
        emb = torch.randn(1, DIM, generator=gen, dtype=torch.float64)
        center = 2.5 * emb
        unit = emb / emb.norm(dim=1, keepdim=True)
        if ((center @ unit.t()) / center.norm()).item() > 1.0:
            break
    else:
        pytest.fail('no rounding case found')
    other = torch.randn(2, DIM, generator=gen, dtype=torch.float64)
    weight = torch.cat([center, other]).requires_grad_(True)
    feats = emb.clone().requires_grad_(True)
    loss = fused_margin_softmax(feats, weight, None, torch.tensor([1]),
                                CombinedMarginLoss(s=4.0, m2=0.5))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(weight.grad[0], torch.zeros(DIM, dtype=torch.float64))
    assert weight.grad[1:].abs().sum() > 0


@pytest.mark.parametrize('sample_rate', [1.0, 0.5])
def test_frozen_centers_and_no_grad(sample_rate):
    """Only the embedding gradient when the centers are frozen; no graph
    and the same loss under ``torch.no_grad`` (both heads draw the same
    samples: same seed, same sequence of calls)."""
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, ), generator=gen)
    weight = torch.randn(NUM_CLASSES, DIM, generator=gen,
                         dtype=torch.float64)
    margin = MARGINS['arcface']
    results = []
    for cls in (CombinedMarginLoss, PlainMargin):
        from mmpfc.models.heads import PartialFCHead
        head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=sample_rate,
                             loss=cls(**margin), seed=4).double().eval()
        with torch.no_grad():
            head.weight.copy_(weight)
            no_grad_loss = head.loss_by_labels(emb, labels)
        head.weight.requires_grad_(False)
        feats = emb.clone().requires_grad_(True)
        loss = head.loss_by_labels(feats, labels)
        loss.backward()
        assert head.weight.grad is None
        assert head.pop_sampled_gradient() is None
        results.append((no_grad_loss, loss.detach(), feats.grad))
    (a0, a1, a2), (b0, b1, b2) = results
    assert not a0.requires_grad
    assert a0.item() == pytest.approx(b0.item(), rel=1e-12)
    assert a1.item() == pytest.approx(b1.item(), rel=1e-12)
    assert torch.allclose(a2, b2, rtol=1e-9, atol=1e-13)


def train_steps(reuse, sample_rate, accumulate, keep_grads):
    """A few SGD steps of one head; returns its weight, momentum, the losses
    and every gradient tensor the test kept from earlier steps (cloned at
    the time and as it is at the end)."""
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    gen = torch.Generator().manual_seed(5)
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=sample_rate,
                         loss=dict(type='CombinedMarginLoss', s=16.0, m2=0.5),
                         seed=3, reuse_buffer=reuse)
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9,
                                  weight_decay=5e-4),
        accumulative_counts=accumulate)
    losses, kept, buffers = [], [], set()
    for _ in range(4 * accumulate):
        emb = torch.randn(BATCH, DIM, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (BATCH, ), generator=gen)
        loss = head.loss_by_labels(emb, labels)
        wrapper.update_params(loss)
        losses.append(loss.item())
        if reuse:
            buffers.add(head.workspace.kept.data_ptr())
    if keep_grads:  # a user keeps the last dense gradient, then steps on
        emb = torch.randn(BATCH, DIM, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (BATCH, ), generator=gen)
        head.loss_by_labels(emb, labels).backward()
        grad = head.weight.grad
        kept.append((grad.clone(), grad))
        head.weight.grad = None
        head.loss_by_labels(emb * 2, labels).backward()
    momentum = wrapper.optimizer.state[head.weight]['momentum_buffer']
    return (head.weight.detach().clone(), momentum.clone(), losses, kept,
            buffers)


@pytest.mark.parametrize('sample_rate,accumulate', [(1.0, 1), (1.0, 2),
                                                    (0.4, 1), (0.4, 2)])
def test_reused_buffer_changes_nothing(sample_rate, accumulate):
    fresh = train_steps(False, sample_rate, accumulate, False)
    reused = train_steps(True, sample_rate, accumulate, False)
    assert reused[2] == fresh[2]  # losses
    assert torch.equal(reused[0], fresh[0])  # weights, bit for bit
    assert torch.equal(reused[1], fresh[1])  # momentum
    if accumulate == 1:  # the buffer really was reused, every step
        assert len(reused[4]) == 1


def test_reused_buffer_is_recycled_only_when_nothing_views_it():
    from mmpfc.models.utils.workspace import Workspace
    space = Workspace()
    like = torch.zeros(1)
    first = space.take(12, like)
    first_ptr = first.data_ptr()
    held = first[:4]  # something still views it: a new buffer
    del first
    second = space.take(12, like)
    assert second.data_ptr() != first_ptr
    del second
    ptr_a = space.take(10, like).data_ptr()  # (the view dies at once)
    ptr_b = space.take(8, like).data_ptr()
    assert ptr_a == ptr_b  # free again: the same memory
    held.fill_(3.0)  # the old buffer lives on for its holder
    assert held.tolist() == [3.0] * 4
    # a user keeping a dense gradient across steps keeps its values
    kept = train_steps(True, 1.0, 1, True)[3]
    (copy, grad), = kept
    assert torch.equal(copy, grad)


def test_storage_use_count_counts_views():
    from mmpfc.utils.compat import storage_use_count
    base = torch.empty(6)
    assert storage_use_count(base) == 1
    view = base[2:]
    assert storage_use_count(base) == storage_use_count(view) == 2
    del view
    assert storage_use_count(base) == 1


def test_copies_of_a_head_do_not_copy_its_buffer():
    import copy
    import pickle

    from mmpfc.models.heads import PartialFCHead
    from mmpfc.models.utils.workspace import Workspace
    head = PartialFCHead(NUM_CLASSES, DIM, reuse_buffer=True)
    head.loss_by_labels(torch.randn(BATCH, DIM),
                        torch.arange(BATCH)).backward()
    assert head.workspace.kept is not None
    from mmpfc.models.utils import is_sharded, sharded_owner

    # e.g. an EMA copy of the model, or a pickled one
    for twin in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        assert twin.workspace.kept is None
        assert torch.equal(twin.weight, head.weight)
        # the copy's shard is sharded and owned by the copy
        assert is_sharded(twin.weight) and sharded_owner(twin.weight) is twin
    assert sharded_owner(head.weight) is head
    assert isinstance(pickle.loads(pickle.dumps(Workspace())), Workspace)


def test_bit_mask_clamp_path_equals_the_plain_composition(monkeypatch):
    """The CUDA way of remembering clamped cosines, run on the CPU."""
    from mmpfc.models.heads import bit_mask
    monkeypatch.setitem(bit_mask.BIT_MASK_CLAMP, 'cpu', True)
    monkeypatch.setattr(bit_mask, 'MASK_BLOCK', 8)  # masks in several blocks
    for sample_rate, chunk_bytes in ((1.0, 64), (0.5, 96)):
        results = compare_worker(0, 1, sample_rate, chunk_bytes)
        for name, (got, want) in results.items():
            assert got[0] == pytest.approx(want[0], rel=1e-12), name
            for a, b in zip(got[1:], want[1:]):
                assert torch.allclose(a, b, rtol=1e-9, atol=1e-13), name
