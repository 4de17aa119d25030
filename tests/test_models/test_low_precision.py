"""16-bit centers: stochastic rounding, dtype checks, the head's storage."""
import pytest
import torch
from helpers import LogRecords
from messages import assert_mentions

from mmpfc.models.heads import MarginSoftmaxHead, PartialFCHead
from mmpfc.models.utils.low_precision import (RoundingNoise,
                                              parse_center_dtype,
                                              stochastic_round)

DRAWS = 4000


def neighbours(values, dtype):
    """The two ``dtype`` values around each fp32 value, from a sorted table
    of every finite value of the format (independent of the rounding)."""
    if dtype == torch.bfloat16:
        table = torch.arange(-2**15, 2**15, dtype=torch.int32).to(
            torch.int16).view(torch.bfloat16).float()
    else:
        table = torch.arange(-2**15, 2**15, dtype=torch.int32).to(
            torch.int16).view(torch.float16).float()
    table = table[torch.isfinite(table)].unique()  # sorted, -0 == +0
    upper = torch.searchsorted(table, values, right=False)
    hi = table[upper.clamp(max=len(table) - 1)]
    lo = table[(upper - 1).clamp(min=0)]
    exact = hi == values
    return torch.where(exact, hi, lo), hi


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased_between_neighbours(dtype):
    noise = RoundingNoise(seed=0)
    values = torch.tensor([1.0 + 1e-3, -1.0 - 2e-3, 0.3337, -7e-3, 1e-2,
                           1.0, -0.5])
    lo, hi = neighbours(values, dtype)
    draws = torch.stack([stochastic_round(values, dtype, noise).float()
                         for _ in range(DRAWS)])
    assert ((draws == lo) | (draws == hi)).all()
    gap = (hi - lo).double()
    expected_up = torch.where(gap > 0, (values.double() - lo) / gap,
                              torch.zeros_like(gap))
    got_up = (draws == hi).double().mean(0)
    got_up = torch.where(gap > 0, got_up, torch.zeros_like(got_up))
    # binomial std at DRAWS draws is at most 0.008
    assert torch.allclose(got_up, expected_up, atol=0.04), (
        got_up, expected_up)
    mean = draws.double().mean(0)
    assert torch.allclose(mean, values.double(), rtol=0,
                          atol=float(gap.max()) * 0.05)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_stochastic_round_keeps_exact_and_non_finite_values(dtype):
    values = torch.tensor([0.0, 1.0, -2.0, 0.5, float('inf'),
                           float('-inf'), float('nan')])
    out = stochastic_round(values, dtype, RoundingNoise(seed=1))
    assert out.dtype == dtype
    assert torch.equal(out[:6].float(), values[:6])
    assert torch.isnan(out[6])


@pytest.mark.parametrize('make', [
    lambda: torch.tensor(1.0 + 1e-3), lambda: torch.randn(3, 4, 8),
    lambda: torch.randn(8, 6).t(), lambda: torch.zeros(0, 5)])
def test_stochastic_round_keeps_any_shape(make):
    values = make()
    out = stochastic_round(values, torch.bfloat16, RoundingNoise(seed=3))
    assert out.shape == values.shape and out.dtype == torch.bfloat16
    lo, hi = neighbours(values.reshape(-1), torch.bfloat16)
    flat = out.float().reshape(-1)
    assert bool(((flat == lo) | (flat == hi)).all())


def test_stochastic_round_is_reproducible_from_its_generator():
    values = torch.randn(1000) * 1e-2
    a = stochastic_round(values, torch.bfloat16, RoundingNoise(3))
    b = stochastic_round(values, torch.bfloat16, RoundingNoise(3))
    c = stochastic_round(values, torch.bfloat16, RoundingNoise(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rounding_noise_is_uniform_16_bit_and_fresh_per_row_and_call():
    """Each element's noise is uniform on [0, 2^16): over 64 x 512 draws the
    16 equal bins of every position hold 2048 +- a chi-square's spread;
    rows of one call and the same row of two calls differ."""
    noise = RoundingNoise(seed=5)
    draws = torch.cat([noise.bits(512, 8, 'cpu') for _ in range(64)])
    assert draws.dtype == torch.int32 and draws.shape == (32768, 8)
    assert int(draws.min()) >= 0 and int(draws.max()) < 2**16
    for column in draws.T:
        counts = torch.bincount(column // 2**12, minlength=16).double()
        expected = column.numel() / 16
        chi2 = float(((counts - expected)**2 / expected).sum())
        assert chi2 < 40, chi2  # 15 degrees of freedom: p < 1e-3 above 37.7
    mean = draws.double().mean()
    assert abs(float(mean) - (2**16 - 1) / 2) < 200  # std of the mean ~110
    first, second = noise.bits(4, 512, 'cpu'), noise.bits(4, 512, 'cpu')
    assert len({tuple(row.tolist()) for row in torch.cat([first, second])
                }) == 8


@pytest.mark.parametrize('width', [1, 7, 512, 2**18 + 10])
def test_every_position_of_a_row_sees_each_16_bit_value_equally_often(width):
    """Exactly uniform noise for a uniform offset: over all the windows a
    row can take, the first and last position hold each of the 2^16 values
    the same number of times (the table has 2^18 entries)."""
    windows = RoundingNoise(seed=0).windows(width, torch.device('cpu'))
    assert windows.shape == (2**18, width)
    for column in (0, width - 1):
        counts = torch.bincount(windows[:, column].long(), minlength=2**16)
        assert counts.numel() == 2**16 and bool((counts == 4).all())


def test_rounding_noise_offsets_span_the_whole_table(monkeypatch):
    drawn = []
    randint = torch.randint

    def spy(high, size, **kwargs):
        drawn.append(high)
        return randint(high, size, **kwargs)

    monkeypatch.setattr(torch, 'randint', spy)
    RoundingNoise(seed=0).bits(3, 16, 'cpu')
    assert drawn == [2**18]


def test_copies_of_rounding_noise_leave_the_table_behind():
    import copy
    import pickle
    noise = RoundingNoise(seed=2)
    noise.bits(2, 8, 'cpu')
    assert len(pickle.dumps(noise)) < 50_000  # the table is 1 MiB
    twin = copy.deepcopy(noise)
    assert torch.equal(twin.bits(4, 8, 'cpu'), noise.bits(4, 8, 'cpu'))


def test_rounding_noise_continues_bit_for_bit_from_its_state():
    noise = RoundingNoise(seed=11)
    noise.bits(3, 64, 'cpu')
    state = noise.state_dict()
    expected = [noise.bits(5, 64, 'cpu') for _ in range(2)]
    resumed = RoundingNoise(seed=0)
    resumed.load_state_dict(state)
    assert resumed.seed == 11
    assert all(torch.equal(resumed.bits(5, 64, 'cpu'), want)
               for want in expected)


def test_small_updates_survive_stochastic_rounding_but_not_nearest():
    """1000 steps of -1e-4 on a weight of 1.0: below half a bf16 step
    (2^-8 / 2), round-to-nearest never moves; stochastic rounding ends
    near 0.9, the fp32 result."""
    noise = RoundingNoise(seed=0)
    nearest = torch.ones(256, dtype=torch.bfloat16)
    rounded = torch.ones(256, dtype=torch.bfloat16)
    for _ in range(1000):
        nearest = (nearest.float() - 1e-4).to(torch.bfloat16)
        rounded = stochastic_round(rounded.float() - 1e-4, torch.bfloat16,
                                   noise)
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert abs(rounded.float().mean().item() - 0.9) < 0.01


def test_unknown_center_dtype_names_the_value():
    with pytest.raises(ValueError) as err:
        parse_center_dtype('int8')
    assert_mentions(err, "center_dtype='int8'",
                    "['bfloat16', 'float16', 'float32']")
    with pytest.raises(ValueError) as err:
        PartialFCHead(num_classes=10, in_channels=8, center_dtype='half')
    assert_mentions(err, 'PartialFCHead', "center_dtype='half'")


@pytest.mark.parametrize('name,dtype', [('bfloat16', torch.bfloat16),
                                        ('float16', torch.float16)])
def test_compact_head_stores_rounded_fp32_init(name, dtype):
    """The 16-bit shard is the fp32 shard of the same seed rounded to
    nearest (drawn block by block, never whole in fp32)."""
    fp32 = PartialFCHead(num_classes=300, in_channels=32, seed=3)
    compact = PartialFCHead(num_classes=300, in_channels=32, seed=3,
                            center_dtype=name)
    assert compact.weight.dtype == dtype
    assert torch.equal(compact.weight, fp32.weight.detach().to(dtype))
    assert compact.row_updates and not compact.samples_centers
    assert compact.rounding is not None and fp32.rounding is None


def test_fp32_checkpoint_into_bf16_head_converts_and_logs():
    fp32 = PartialFCHead(num_classes=50, in_channels=16, seed=1)
    compact = PartialFCHead(num_classes=50, in_channels=16, seed=2,
                            center_dtype='bfloat16')
    with LogRecords() as messages:
        compact.load_state_dict(fp32.state_dict())
    assert torch.equal(compact.weight,
                       fp32.weight.detach().to(torch.bfloat16))
    assert any('weight' in m and 'converted' in m and 'float32' in m and
               'center_dtype bfloat16' in m for m in messages), messages
    back = PartialFCHead(num_classes=50, in_channels=16, seed=4)
    back.load_state_dict(compact.state_dict())  # the reverse is exact
    assert torch.equal(back.weight, compact.weight.float())


def test_fp16_head_refuses_values_beyond_its_range():
    big = PartialFCHead(num_classes=20, in_channels=8, seed=1)
    with torch.no_grad():
        big.weight[3, 2] = 7.0e4
    half = PartialFCHead(num_classes=20, in_channels=8, center_dtype='float16')
    with pytest.raises(ValueError) as err:
        half.load_state_dict(big.state_dict())
    # the value, the format's largest, and the dtype that holds it
    assert_mentions(err, 'weight', "center_dtype='float16'", '70000',
                    '65504', "center_dtype='bfloat16'")


def test_compact_model_parallel_gradient_is_fp32_record():
    """Model parallel on a bf16 shard: no bf16 weight.grad; every row's
    fp32 gradient waits for the optim wrapper, equal to the fp32 head's
    gradient of the same (rounded) centers."""
    torch.manual_seed(0)
    compact = PartialFCHead(num_classes=40, in_channels=16, seed=1,
                            center_dtype='bfloat16')
    fp32 = PartialFCHead(num_classes=40, in_channels=16, seed=1)
    with torch.no_grad():
        fp32.weight.copy_(compact.weight.float())
    emb, labels = torch.randn(8, 16), torch.randint(0, 40, (8,))
    compact.loss_by_labels(emb, labels).backward()
    fp32.loss_by_labels(emb, labels).backward()
    assert compact.weight.grad is None
    rows, grad = compact.pop_sampled_gradient()
    assert torch.equal(rows, torch.arange(40))
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, fp32.weight.grad, rtol=1e-5,
                               atol=1e-7)


def test_data_parallel_head_accepts_the_storage_dtype():
    """MarginSoftmaxHead in bf16: the loss is the fp32 loss of the rounded
    centers (fp32 logits); its gradient is the parameter's, in bf16."""
    compact = MarginSoftmaxHead(num_classes=30, in_channels=16, seed=1,
                                center_dtype='bfloat16')
    fp32 = MarginSoftmaxHead(num_classes=30, in_channels=16, seed=1)
    assert compact.weight.dtype == torch.bfloat16
    with torch.no_grad():
        fp32.weight.copy_(compact.weight.float())
    emb, labels = torch.randn(6, 16), torch.randint(0, 30, (6,))
    loss = compact.loss_by_labels(emb, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fp32.loss_by_labels(emb, labels))
    loss.backward()
    assert compact.weight.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"center_dtype='fp8'"):
        MarginSoftmaxHead(num_classes=3, in_channels=4, center_dtype='fp8')


def test_nearest_rounding_loses_the_updates_stochastic_keeps():
    """20 SGD steps of a bf16 shard against the same steps in fp32 from the
    same centers: most updates are below half a bf16 step, so 'nearest'
    keeps about half of the fp32 movement and points elsewhere;
    'stochastic' follows it (measured: cos 0.46 vs 0.87, length 0.59 vs
    1.15 of the fp32 movement)."""
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 64, generator=gen)
    labels = torch.randint(0, 16, (32, ), generator=gen)
    result = {}
    for rounding in ('nearest', 'stochastic', None):
        head = PartialFCHead(
            num_classes=16, in_channels=64, seed=1, init_std=1.0,
            center_dtype='float32' if rounding is None else 'bfloat16',
            center_rounding=rounding or 'stochastic')
        if rounding is None:  # fp32 from the rounded start
            with torch.no_grad():
                head.weight.copy_(result['start'])
        result['start'] = head.weight.detach().float().clone()
        wrapper = PartialFCOptimWrapper(optimizer=torch.optim.SGD(
            head.parameters(), lr=1e-2))
        for _ in range(20):
            wrapper.update_params(head.loss_by_labels(emb, labels))
        result[rounding] = head.weight.detach().float() - result['start']
    fp32 = result[None].flatten()
    for rounding, (min_cos, max_cos, low, high) in {
            'nearest': (0.0, 0.7, 0.0, 0.75),
            'stochastic': (0.75, 1.0, 0.85, 1.5)}.items():
        change = result[rounding].flatten()
        cos = torch.nn.functional.cosine_similarity(change, fp32, dim=0)
        length = change.norm() / fp32.norm()
        assert min_cos < cos < max_cos, (rounding, cos)
        assert low < length < high, (rounding, length)
    with pytest.raises(ValueError) as err:
        PartialFCHead(num_classes=4, in_channels=4, center_rounding='up')
    assert_mentions(err, "center_rounding='up'", "['stochastic', 'nearest']")
