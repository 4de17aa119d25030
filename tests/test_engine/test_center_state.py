"""Compact optimizer state of the centers (bf16, block-wise int8) and the
row updates of 16-bit centers, against updates written out here."""
import pytest
import torch
from helpers import LogRecords
from messages import assert_mentions

from mmpfc.engine.optimizers import (PartialFCAmpOptimWrapper,
                                     PartialFCOptimWrapper)
from mmpfc.engine.optimizers.center_state import decode, encode
from mmpfc.engine.optimizers.sparse_sgd import sparse_sgd_step
from mmpfc.models.heads import PartialFCHead

LR, MOMENTUM, DECAY = 0.1, 0.9, 5e-4


def int8_values(codes, absmax, block=64):
    """The documented signed code, written out: value = absmax * code / 127
    with one absmax per block of 64 inside a row."""
    scale = absmax.repeat_interleave(block, dim=1)[:, :codes.shape[1]]
    return scale * codes.float() / 127


def test_int8_codes_follow_the_documented_code():
    """Signed states: value = absmax * code / 127 per block of 64 inside a
    row, each code the nearest."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 100, generator=gen) * torch.logspace(
        -4, 1, 100)  # wide dynamic range inside a row, D not a multiple
    codes, absmax = encode(values, 127, 1, signed=True)
    assert codes.dtype == torch.int8 and codes.shape == (5, 100)
    assert absmax.shape == (5, 2)  # ceil(100 / 64) blocks per row
    for row in range(5):
        for block, (a, b) in enumerate(((0, 64), (64, 100))):
            part = values[row, a:b].double()
            scale = part.abs().max()
            assert absmax[row, block].item() == pytest.approx(scale.item())
            ideal = 127 * part / scale
            code = codes[row, a:b].double()
            assert ((code - ideal).abs() <= 0.5 + 1e-5).all()
            mine = scale * code / 127
            torch.testing.assert_close(
                decode(codes, absmax, 127, 1)[row, a:b].double(), mine,
                rtol=1e-6, atol=1e-12)


def test_int8_blocks_stay_inside_rows():
    """Rows encode alone as they do together: a re-split by rows is
    exact."""
    values = torch.randn(9, 128)
    codes, absmax = encode(values, 127, 1, signed=True)
    top, top_scale = encode(values[:4], 127, 1, signed=True)
    assert torch.equal(codes[:4], top) and torch.equal(absmax[:4], top_scale)


def test_unsigned_code_keeps_small_second_moments():
    """exp_avg_sq spans many decades inside a block; power 4 on 255 levels
    keeps a value 1e-6 of the block's largest non-zero (a linear code
    would give 0 and Adam's step exp_avg / eps)."""
    values = torch.tensor([[1.0, 1e-2, 1e-4, 1e-6] + [0.5] * 60])
    codes, absmax = encode(values, 255, 4, signed=False)
    back = decode(codes, absmax, 255, 4)
    assert codes.dtype == torch.uint8
    assert (back[0, :4] > 0).all()
    rel = ((back - values).abs() / values)[0, :4]
    assert rel.max() < 0.9


def reference_sgd(weight, momentum, grad):
    """torch.optim.SGD's rule in float64 (weight decay, momentum, no
    dampening)."""
    step = grad + DECAY * weight
    momentum = MOMENTUM * momentum + step
    return weight - LR * momentum, momentum


def run_rows(center_dtype, state_dtype, steps=30, sample_rate=0.5):
    """A head trained with fixed gradients through the wrapper; returns
    the head, its optimizer and the float64 reference of the same rows."""
    head = PartialFCHead(num_classes=64, in_channels=64, seed=1,
                         sample_rate=sample_rate, center_dtype=center_dtype)
    optimizer = torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM,
                                weight_decay=DECAY)
    wrapper = PartialFCOptimWrapper(optimizer=optimizer,
                                    center_state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(2)
    weight = head.weight.detach().double().clone()
    momentum = torch.zeros_like(weight)
    popped = []
    pop = head.pop_sampled_gradient

    def seen_pop():  # the rows and gradient the wrapper's step takes
        popped.append(pop())
        return popped[-1]

    head.pop_sampled_gradient = seen_pop
    for _ in range(steps):
        emb = torch.randn(16, 64, generator=gen)
        labels = torch.randint(0, 64, (16, ), generator=gen)
        loss = head.loss_by_labels(emb, labels)
        wrapper.backward(loss)
        dense = None if head.row_updates else head.weight.grad.clone()
        wrapper.step()
        if head.row_updates:
            assert len(popped) == 1
            rows, grad = popped.pop()
        else:
            rows, grad = torch.arange(64), dense
        new_w, new_m = reference_sgd(weight[rows], momentum[rows],
                                     grad.double())
        weight[rows], momentum[rows] = new_w, new_m
        wrapper.zero_grad()
    return head, optimizer, weight, momentum


# Errors relative to the largest value, measured at about half these
# bounds: a bf16 centre moves by stochastic rounding about two bf16 steps
# (2^-8 relative) from fp64 in 30 steps; int8 momentum is written within
# half a code step (0.5 / 127 of its block's absmax) each time.
@pytest.mark.parametrize('center_dtype,state_dtype,weight_tol,state_tol', [
    ('float32', 'float32', 1e-6, 1e-6),
    ('float32', 'bfloat16', 8e-3, 1.6e-2),
    ('float32', 'int8', 2e-2, 4e-2),
    ('bfloat16', 'float32', 2.5e-2, 1e-3),
    ('bfloat16', 'bfloat16', 2.5e-2, 2.5e-2),
    ('bfloat16', 'int8', 3.5e-2, 4e-2),
    ('float16', 'int8', 2e-2, 4e-2),
])
def test_compact_rows_follow_fp64_sgd(center_dtype, state_dtype, weight_tol,
                                      state_tol):
    """30 sampled steps: the stored centers and momentum stay within the
    rounding of their forms of float64 SGD on the same gradients."""
    head, optimizer, weight, momentum = run_rows(center_dtype, state_dtype)
    state = optimizer.state[head.weight]
    scale = weight.abs().max().item()
    err = (head.weight.detach().double() - weight).abs().max().item()
    assert err <= weight_tol * scale, (err, scale)
    if state_dtype == 'int8':
        assert state['momentum_buffer'].dtype == torch.int8
        got = int8_values(state['momentum_buffer'],
                          state['momentum_buffer_absmax'])
    else:
        got = state['momentum_buffer'].float()
        assert state['momentum_buffer'].dtype == getattr(torch, state_dtype)
    m_scale = momentum.abs().max().item()
    assert (got.double() - momentum).abs().max().item() <= state_tol * m_scale


def test_nesterov_step_with_int8_momentum_follows_fp64():
    """Nesterov reads the new momentum after it is written: three steps on
    the same rows stay within the int8 momentum's rounding of fp64."""
    gen = torch.Generator().manual_seed(4)
    param = torch.nn.Parameter(torch.randn(10, 128, generator=gen))
    optimizer = torch.optim.SGD([param], lr=LR, momentum=MOMENTUM,
                                weight_decay=DECAY, nesterov=True)
    rows = torch.tensor([1, 4, 7])
    weight = param.detach().double().clone()
    momentum = torch.zeros(3, 128, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(3, 128, generator=gen)
        sparse_sgd_step(optimizer, param, rows, grad, state_form='int8')
        step = grad.double() + DECAY * weight[rows]
        momentum = MOMENTUM * momentum + step
        weight[rows] -= LR * (step + MOMENTUM * momentum)
    # each decoded momentum is off by at most half a code step (0.5 / 127
    # of its block's absmax), and enters two later updates (the momentum
    # and the nesterov term) with factor MOMENTUM
    code_step = 0.5 / 127 * momentum.abs().max().item()
    bound = 3 * LR * (1 + MOMENTUM) * MOMENTUM * code_step
    err = (param.detach().double() - weight).abs().max().item()
    assert 0 < err <= bound, (err, bound)


@pytest.mark.parametrize('nesterov,dampening,maximize', [
    (False, 0.3, False), (True, 0.0, False), (False, 0.0, True)])
def test_all_rows_every_step_is_torch_sgd(nesterov, dampening, maximize):
    """Every row in every step: exactly torch.optim.SGD's rule, its first
    step (momentum = the step, undampened) included."""
    gen = torch.Generator().manual_seed(6)
    start = torch.randn(6, 16, generator=gen)
    grads = [torch.randn(6, 16, generator=gen) for _ in range(3)]
    kwargs = dict(lr=LR, momentum=MOMENTUM, weight_decay=DECAY,
                  dampening=dampening, nesterov=nesterov, maximize=maximize)
    ours = torch.nn.Parameter(start.clone())
    theirs = torch.nn.Parameter(start.clone())
    sparse_opt = torch.optim.SGD([ours], **kwargs)
    torch_opt = torch.optim.SGD([theirs], **kwargs)
    for grad in grads:
        sparse_sgd_step(sparse_opt, ours, torch.arange(6), grad)
        theirs.grad = grad.clone()
        torch_opt.step()
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert torch.allclose(sparse_opt.state[ours]['momentum_buffer'],
                          torch_opt.state[theirs]['momentum_buffer'],
                          rtol=0, atol=1e-6)


def test_model_parallel_fp32_centers_with_int8_state():
    """sample_rate=1 with fp32 centers: the dense weight.grad is taken by
    the wrapper's row rule (torch's SGD would keep fp32 momentum)."""
    head, optimizer, weight, _ = run_rows('float32', 'int8', steps=10,
                                          sample_rate=1.0)
    assert optimizer.state[head.weight]['momentum_buffer'].dtype == \
        torch.int8
    err = (head.weight.detach().double() - weight).abs().max().item()
    assert err < 2e-2 * weight.abs().max().item()


def test_state_survives_a_state_dict_round_trip_exactly():
    """torch's load casts state to the parameter's dtype; the wrapper
    keeps int8 codes, fp32 scales of a bf16 shard and Adam's float64
    row_step as saved."""
    head = PartialFCHead(num_classes=64, in_channels=64, seed=1,
                         sample_rate=0.5, center_dtype='bfloat16')
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.AdamW(head.parameters(), lr=1e-3),
        center_state_dtype='int8')
    for _ in range(3):
        wrapper.update_params(head.loss_by_labels(torch.randn(8, 64),
                                                  torch.randint(0, 64, (8,))))
    saved = wrapper.state_dict()
    fresh_head = PartialFCHead(num_classes=64, in_channels=64, seed=1,
                               sample_rate=0.5, center_dtype='bfloat16')
    fresh = PartialFCOptimWrapper(
        optimizer=torch.optim.AdamW(fresh_head.parameters(), lr=1e-3),
        center_state_dtype='int8')
    fresh.load_state_dict(saved)
    got = fresh.optimizer.state[fresh_head.weight]
    want = wrapper.optimizer.state[head.weight]
    assert got['exp_avg_absmax'].dtype == torch.float32
    assert got['row_step'].dtype == torch.float64
    assert got['exp_avg_sq'].dtype == torch.uint8
    for key in ('exp_avg', 'exp_avg_absmax', 'exp_avg_sq',
                'exp_avg_sq_absmax', 'row_step'):
        assert torch.equal(got[key], want[key]), key


def test_fp32_state_resumed_as_int8_converts_and_logs():
    head = PartialFCHead(num_classes=64, in_channels=64, seed=1,
                         sample_rate=0.5)
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9))
    wrapper.update_params(head.loss_by_labels(torch.randn(8, 64),
                                              torch.randint(0, 64, (8,))))
    fp32 = wrapper.optimizer.state[head.weight]['momentum_buffer'].clone()
    compact = PartialFCOptimWrapper(
        optimizer=torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9),
        center_state_dtype='int8')
    with LogRecords() as messages:
        compact.load_state_dict(wrapper.state_dict())
    state = compact.optimizer.state[head.weight]
    assert state['momentum_buffer'].dtype == torch.int8
    back = int8_values(state['momentum_buffer'],
                       state['momentum_buffer_absmax'])
    assert (back - fp32).abs().max() <= fp32.abs().max() * 0.5 / 127
    assert any("center_state_dtype='int8'" in m and
               'momentum_buffer' in m and 'float32 -> int8' in m
               for m in messages), messages


def test_bad_state_dtype_and_optimizer_without_row_rule():
    head = PartialFCHead(num_classes=8, in_channels=4, sample_rate=0.5)
    with pytest.raises(ValueError) as err:
        PartialFCOptimWrapper(optimizer=torch.optim.SGD(
            head.parameters(), lr=0.1), center_state_dtype='fp8')
    assert_mentions(err, "center_state_dtype='fp8'",
                    "['float32', 'bfloat16', 'int8']")
    with pytest.raises(ValueError) as err:
        PartialFCOptimWrapper(optimizer=torch.optim.RMSprop(
            head.parameters(), lr=0.1), center_state_dtype='int8')
    assert_mentions(err, "center_state_dtype='int8'", 'SGD, AdamW, Adam',
                    'RMSprop')
    with pytest.raises(ValueError, match=r"center_state_dtype='int4'"):
        PartialFCAmpOptimWrapper(optimizer=torch.optim.SGD(
            head.parameters(), lr=0.1), center_state_dtype='int4')


@pytest.mark.parametrize('state_dtype,tolerance', [('bfloat16', 0.01),
                                                   ('int8', 0.05)])
def test_adamw_with_compact_moments_follows_torch_adamw(state_dtype,
                                                        tolerance):
    """Model parallel, fp32 centers, compact moments: 10 AdamW steps move
    the centers as torch.optim.AdamW (float64, same gradients) does, within
    the moments' rounding (measured 0.2 % bf16, 2.2 % int8 of the
    movement)."""
    head = PartialFCHead(num_classes=64, in_channels=64, seed=1)
    wrapper = PartialFCOptimWrapper(
        optimizer=torch.optim.AdamW(head.parameters(), lr=1e-3,
                                    weight_decay=0.1),
        center_state_dtype=state_dtype)
    ref = torch.nn.Parameter(head.weight.detach().double().clone())
    ref_optimizer = torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.1)
    start = ref.detach().clone()
    gen = torch.Generator().manual_seed(4)
    for _ in range(10):
        emb = torch.randn(16, 64, generator=gen)
        labels = torch.randint(0, 64, (16, ), generator=gen)
        wrapper.backward(head.loss_by_labels(emb, labels))
        ref.grad = head.weight.grad.double().clone()
        wrapper.step()
        wrapper.zero_grad()
        ref_optimizer.step()
    state = wrapper.optimizer.state[head.weight]
    assert state['exp_avg_sq'].dtype == (torch.uint8 if state_dtype == 'int8'
                                         else torch.bfloat16)
    moved = ref.detach() - start
    error = (head.weight.detach().double() - ref.detach()).norm()
    assert error / moved.norm() < tolerance, (error / moved.norm()).item()
