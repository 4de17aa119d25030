"""fp16 loss scaling with a sharded, sampled head (CPU fp16 + CPU GradScaler,
the same code path as CUDA): an overflow in one rank's sampled centers makes
every rank skip the step and halve the scale; clean steps update alike."""
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

import mmpfc  # noqa: F401

NUM_CLASSES, DIM, BATCH = 20, 8, 4


def amp_worker(rank, world_size, poison_step):
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    torch.manual_seed(0)  # same backbone on every rank
    backbone = torch.nn.Linear(6, DIM)
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.5, seed=1)
    wrapper = PartialFCAmpOptimWrapper(
        # dynamic, from a scale at which these tiny embeddings' gradients
        # fit fp16 (at 2**16 the first steps overflow for real)
        dtype='float16', loss_scale=dict(init_scale=16.0),
        optimizer=torch.optim.SGD(
            [*backbone.parameters(), *head.parameters()], lr=0.1,
            momentum=0.9))
    if rank == 1:  # an overflow in this rank's sampled-center gradient only
        original = head.pop_sampled_gradient

        def poisoned():
            rows, grad = original()
            if len(history) == poison_step:
                grad[0, 0] = float('inf')
            return rows, grad
        head.pop_sampled_gradient = poisoned
    gen = torch.Generator().manual_seed(10 + rank)
    history = []
    for _ in range(3):
        before = (backbone.weight.detach().clone(),
                  head.weight.detach().clone())
        inputs = torch.randn(BATCH, 6, generator=gen)
        labels = torch.randint(0, NUM_CLASSES, (BATCH, ), generator=gen)
        with wrapper.optim_context(backbone):
            feats = backbone(inputs)
        assert feats.dtype == torch.float16
        loss = head.loss_by_labels(feats, labels)
        wrapper.backward(loss)
        for p in backbone.parameters():  # what DDP does
            dist.all_reduce(p.grad)
            p.grad.div_(world_size)
        scale = wrapper.loss_scaler.get_scale()
        wrapper.step()
        wrapper.zero_grad()
        history.append(dict(
            scale=scale, next_scale=wrapper.loss_scaler.get_scale(),
            backbone_changed=not torch.equal(backbone.weight, before[0]),
            head_changed=not torch.equal(head.weight, before[1]),
            backbone=backbone.weight.detach().clone()))
    return history


def test_overflow_on_one_rank_skips_the_step_on_every_rank():
    ranks = run_distributed(amp_worker, 2, 1)
    for history in ranks:
        clean, poisoned, after = history
        assert clean['backbone_changed'] and clean['head_changed']
        assert clean['next_scale'] == clean['scale'] == 16.0
        # rank 1 saw inf: both ranks skip, both halve the scale
        assert not poisoned['backbone_changed']
        assert not poisoned['head_changed']
        assert poisoned['next_scale'] == poisoned['scale'] / 2
        assert after['backbone_changed'] and after['head_changed']
    for step in range(3):  # the replicated backbone stays identical
        assert torch.equal(ranks[0][step]['backbone'],
                           ranks[1][step]['backbone'])


def test_cpu_dtype_options():
    import pytest

    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    params = [torch.nn.Parameter(torch.zeros(2))]
    bf16 = PartialFCAmpOptimWrapper(optimizer=torch.optim.SGD(params, lr=1))
    assert bf16.loss_scaler is None and bf16.cast_dtype == torch.bfloat16
    static = PartialFCAmpOptimWrapper(
        dtype='float16', loss_scale=128.0,
        optimizer=torch.optim.SGD(params, lr=1))
    assert static.loss_scaler.get_scale() == 128.0
    with pytest.raises(ValueError, match="dtype='float64': on the CPU"):
        PartialFCAmpOptimWrapper(dtype='float64',
                                 optimizer=torch.optim.SGD(params, lr=1))


def head_only_steps(poison_step):
    """Loss-scaled steps of a sampled head whose backbone is frozen: no
    replicated parameter has a gradient, so ``unscale_`` records no flag."""
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    torch.manual_seed(0)
    backbone = torch.nn.Linear(6, DIM).requires_grad_(False)
    head = PartialFCHead(NUM_CLASSES, DIM, sample_rate=0.5, seed=1)
    wrapper = PartialFCAmpOptimWrapper(
        dtype='float16', loss_scale=dict(init_scale=16.0, growth_interval=2),
        optimizer=torch.optim.SGD(
            [*backbone.parameters(), *head.parameters()], lr=0.1))
    original = head.pop_sampled_gradient

    def poisoned():
        rows, grad = original()
        if len(scales) == poison_step:
            grad[0, 0] = float('nan')
        return rows, grad
    head.pop_sampled_gradient = poisoned
    gen = torch.Generator().manual_seed(3)
    scales, changed = [], []
    for _ in range(3):
        before = head.weight.detach().clone()
        with wrapper.optim_context(backbone):
            feats = backbone(torch.randn(BATCH, 6, generator=gen))
        labels = torch.randint(0, NUM_CLASSES, (BATCH, ), generator=gen)
        wrapper.backward(head.loss_by_labels(feats, labels))
        assert all(p.grad is None for p in backbone.parameters())
        wrapper.step()
        wrapper.zero_grad()
        scales.append(wrapper.loss_scaler.get_scale())
        changed.append(not torch.equal(head.weight, before))
    return scales, changed


def test_head_only_training_is_loss_scaled():
    """A frozen backbone (head-only fine-tuning) used to fail the AMP step
    with GradScaler's "No inf checks were recorded prior to update"."""
    scales, changed = head_only_steps(poison_step=None)
    assert changed == [True, True, True]
    # growth_interval=2: the scale doubles after two clean steps
    assert scales == [16.0, 32.0, 32.0]


def test_head_only_overflow_skips_the_step_and_backs_off():
    scales, changed = head_only_steps(poison_step=1)
    assert changed == [True, False, True]
    assert scales == [16.0, 8.0, 8.0]


@pytest.mark.parametrize('center_dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('poison', [False, True])
def test_replicated_16bit_centers_are_loss_scaled(center_dtype, poison):
    """A replicated head's fp16 / bf16 centers have a dense 16-bit
    gradient, which GradScaler.unscale_ refuses (fp16) or cannot unscale on
    CUDA (bf16): it is unscaled beside the scaler, and an inf in it skips
    the step and halves the scale."""
    from mmpfc.engine.optimizers import PartialFCAmpOptimWrapper
    from mmpfc.models.heads import MarginSoftmaxHead
    torch.manual_seed(0)
    head = MarginSoftmaxHead(NUM_CLASSES, DIM, center_dtype=center_dtype)
    assert head.weight.dtype == getattr(torch, center_dtype)
    wrapper = PartialFCAmpOptimWrapper(
        dtype='float16', loss_scale=dict(init_scale=16.0),
        optimizer=torch.optim.SGD(head.parameters(), lr=0.5))
    feats = torch.randn(BATCH, DIM)
    labels = torch.arange(BATCH)
    with wrapper.optim_context(head):
        loss = head.loss_by_labels(feats, labels)
    wrapper.backward(loss)
    scaled = head.weight.grad.clone()
    if poison:
        head.weight.grad[0, 0] = float('inf')
    before = head.weight.detach().clone()
    wrapper.step()
    if poison:
        assert torch.equal(head.weight, before)  # skipped
        assert wrapper.loss_scaler.get_scale() == 8.0
        return
    unscaled = scaled * (1 / 16.0)  # a power of two: exact
    assert torch.equal(head.weight.grad, unscaled)
    assert torch.equal(head.weight.detach(), before - 0.5 * unscaled)
    assert wrapper.loss_scaler.get_scale() == 16.0


def test_fp16_gradients_are_clipped_by_their_fp32_norm():
    """torch takes an fp16 gradient's norm in fp16: past 65504 it is inf
    and the clip zeroes every gradient. Reference: the norm of the same
    values in float64, then max_norm / norm times each gradient."""
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    dense = torch.nn.Parameter(torch.zeros(3))
    narrow = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD([dense, narrow], lr=1.0),
        clip_grad=dict(max_norm=5.0))
    dense.grad = torch.tensor([3.0, 4.0, 0.0])
    narrow.grad = torch.tensor([60000.0, 60000.0], dtype=torch.float16)
    norm = wrapper._clip_params()
    want = torch.tensor([3.0, 4.0, 0.0, 60000.0, 60000.0],
                        dtype=torch.float64).norm()
    assert abs(float(norm) - float(want)) / float(want) < 1e-6
    coef = 5.0 / float(want)
    torch.testing.assert_close(dense.grad.double(),
                               torch.tensor([3.0, 4.0, 0.0]).double() * coef)
    torch.testing.assert_close(
        narrow.grad.double(), torch.full((2, ), 60000.0).double() * coef,
        rtol=1e-3, atol=0)
