"""Adam / AdamW on sampled centers: each row follows torch's own optimizer
stepped only when the row is sampled; unsampled rows are untouched."""
import pytest
import torch
from messages import assert_mentions

import mmpfc  # noqa: F401
from mmpfc.checkpoint.sharded_state import split_state
from mmpfc.engine.optimizers import sparse_adam_step, sparse_step

ROWS, DIM, STEPS = 10, 4, 6
DEFAULTS = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def run(optimizer_cls, **options):
    """Sparse steps on a (ROWS, DIM) parameter, and the same updates done by
    one torch optimizer per row, stepped only when its row is sampled."""
    kwargs = dict(DEFAULTS, **options)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(ROWS, DIM, generator=gen)
    param = torch.nn.Parameter(init.clone())
    optimizer = optimizer_cls([param], **kwargs)
    singles = [torch.nn.Parameter(init[r:r + 1].clone()) for r in range(ROWS)]
    references = [optimizer_cls([p], **kwargs) for p in singles]
    for _ in range(STEPS):
        rows = torch.randperm(ROWS, generator=gen)[:4].sort().values
        grad = torch.randn(len(rows), DIM, generator=gen)
        before = param.detach().clone()
        sparse_step(optimizer, param, rows, grad)
        untouched = torch.ones(ROWS, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(param.detach()[untouched], before[untouched])
        for row, g in zip(rows.tolist(), grad):
            singles[row].grad = g[None].clone()
            references[row].step()
    expected = torch.cat([p.detach() for p in singles])
    return param.detach(), expected, optimizer.state[param]


@pytest.mark.parametrize('optimizer_cls,options', [
    (torch.optim.AdamW, {}),
    (torch.optim.Adam, {}),
    (torch.optim.AdamW, dict(maximize=True)),
    (torch.optim.Adam, dict(weight_decay=0.0)),
])
def test_rows_follow_torch_optimizer_when_sampled(optimizer_cls, options):
    got, expected, state = run(optimizer_cls, **options)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert state['row_step'].sum() == 4 * STEPS  # one count per update
    # every state tensor has one row per local class: checkpoints shard it
    rows, rest = split_state(state, ROWS)
    assert set(rows) == {'exp_avg', 'exp_avg_sq', 'row_step'}
    assert rest == {'step': torch.tensor(float(STEPS))}


def test_row_sampled_every_step_matches_dense_adamw():
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(ROWS, DIM, generator=gen)
    sparse, dense = (torch.nn.Parameter(init.clone()) for _ in range(2))
    opt_sparse = torch.optim.AdamW([sparse], **DEFAULTS)
    opt_dense = torch.optim.AdamW([dense], **DEFAULTS)
    every = torch.arange(ROWS)
    for _ in range(STEPS):
        grad = torch.randn(ROWS, DIM, generator=gen)
        sparse_adam_step(opt_sparse, sparse, every, grad)
        dense.grad = grad
        opt_dense.step()
    torch.testing.assert_close(sparse.detach(), dense.detach(), rtol=1e-5,
                               atol=1e-6)
    assert not torch.equal(dense.detach(), init)


def test_refused_options_and_optimizers():
    param = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    rows, grad = torch.arange(2), torch.ones(2, DIM)
    with pytest.raises(ValueError, match='amsgrad=True'):
        sparse_step(torch.optim.AdamW([param], amsgrad=True), param, rows,
                    grad)
    with pytest.raises(TypeError) as err:
        sparse_step(torch.optim.RMSprop([param]), param, rows, grad)
    assert_mentions(err, 'SGD, AdamW, Adam', 'RMSprop')


def test_partial_fc_head_trains_with_adamw():
    from mmpfc.engine.optimizers import PartialFCOptimWrapper
    from mmpfc.models.heads import PartialFCHead
    gen = torch.Generator().manual_seed(2)
    head = PartialFCHead(40, 8, sample_rate=0.25, seed=0)
    wrapper = PartialFCOptimWrapper(optimizer=torch.optim.AdamW(
        head.parameters(), lr=0.01, weight_decay=0.1))
    for _ in range(3):
        before = head.weight.detach().clone()
        emb = torch.randn(6, 8, generator=gen)
        labels = torch.randint(0, 40, (6, ), generator=gen)
        loss = head.loss_by_labels(emb, labels)
        wrapper.update_params(loss)
        changed = (head.weight.detach() != before).any(dim=1)
        assert changed[labels].all()  # positives are always sampled
        assert changed.sum() == 10  # max(int(0.25 * 40), positives)
    assert torch.isfinite(loss)
