"""Margin state resumes bit-identically.

The margins with state keep it in buffers: CurricularFace its running mean
``t`` of the target cosines, AdaFace the running mean and std of the
feature norms, ElasticFace the (seed, draws) pair its per-row margins are
drawn from. A resumed run that lost or mis-restored any of them would
continue with other margins and drift from the run it resumes. The tiny
run of ``tiny_training.py`` trains 2 x 5 steps straight and 5 + resume + 5:
AdaFace and ElasticFace on 2 gloo ranks (both margins in the same two
spawns: one run after the other in each process), CurricularFace on one
rank in this process; the 2-rank checkpoints are also resumed on 1 rank
(the shard re-split) and must give the same buffers.
"""
import os.path as osp

import pytest
import torch
from dist_utils import run_distributed
from mmengine.hooks import Hook
from tiny_training import build_runner, head_state, make_cfg

from mmpfc.registry import HOOKS

# t_alpha well above the authors' 0.01 so that 5 steps move the statistics
MARGINS = {
    'adaface': dict(type='AdaFaceLoss', s=16.0, m=0.4, h=0.333, t_alpha=0.3),
    'elasticface': dict(type='ElasticFaceLoss', s=16.0, m=0.5, std=0.05,
                        kind='arc'),
    'curricularface': dict(type='CurricularFaceLoss', s=16.0, m=0.5,
                           t_alpha=0.3),
}
#: Each margin's buffers before any training step.
INITIAL = {
    'adaface': dict(batch_mean=20.0, batch_std=100.0),
    'elasticface': dict(draws=0),
    'curricularface': dict(t=0.0),
}
DISTRIBUTED = ('adaface', 'elasticface')
RUN = dict(max_iters=10, interval=5, sample_rate=0.5)
HALF = 5


@HOOKS.register_module(force=True)
class MarginCaptureHook(Hook):
    """Keeps the margin's buffers as training starts (after any load) and
    after step ``HALF`` (what the checkpoint of that step holds)."""

    def before_train(self, runner):
        runner.margin_start = margin_state(runner)
        runner.margin_half = None

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == HALF:
            runner.margin_half = margin_state(runner)


def margin_state(runner) -> dict:
    model = getattr(runner.model, 'module', runner.model)
    return {k: v.detach().clone()
            for k, v in model.head.margin_loss.state_dict().items()}


def train_margins(rank, world_size, root, jobs):
    """Train every ``(name, make_cfg kwargs)`` of ``jobs`` in turn, each in
    ``root/name``; per name the head, backbone and margin state at the start
    (after any load) and at the end."""
    out = {}
    for name, kwargs in jobs:
        cfg = make_cfg(osp.join(root, name), world_size=world_size,
                       **kwargs)
        cfg.custom_hooks.append(dict(type='MarginCaptureHook'))
        runner = build_runner(cfg)
        runner.train()
        out[name] = dict(start=runner.captured, final=head_state(runner),
                         margin_start=runner.margin_start,
                         margin_half=runner.margin_half,
                         margin=margin_state(runner))
    return out


def straight_jobs(names):
    return [(n, dict(RUN, loss=MARGINS[n])) for n in names]


def resume_jobs(names, straight_root, **overrides):
    return [(n, dict(RUN, loss=MARGINS[n], resume=True, load_from=osp.join(
        straight_root, n, f'iter_{HALF}.pth'), **overrides)) for n in names]


def assert_same_run(got: dict, ref: dict) -> None:
    """Final rows, momentum, backbone and margin buffers bit-identical."""
    assert got['final']['iter'] == ref['final']['iter'] == RUN['max_iters']
    assert torch.equal(got['final']['weight'], ref['final']['weight'])
    assert torch.equal(got['final']['momentum'], ref['final']['momentum'])
    for key, value in ref['final']['backbone'].items():
        assert torch.equal(got['final']['backbone'][key], value), key
    assert_same_buffers(got['margin'], ref['margin'])


def assert_same_buffers(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value), key


def assert_moved(name: str, buffers: dict) -> None:
    """Training changed every buffer that training changes."""
    for key, initial in INITIAL[name].items():
        assert not torch.equal(buffers[key],
                               torch.tensor(initial).to(buffers[key])), key


@pytest.fixture(scope='module')
def distributed(tmp_path_factory):
    """AdaFace and ElasticFace, 2 ranks: straight, then resumed at 5."""
    root = tmp_path_factory.mktemp('margins')
    straight_root = str(root / 'straight')
    straight = run_distributed(train_margins, 2, straight_root,
                               straight_jobs(DISTRIBUTED))
    resumed = run_distributed(train_margins, 2, str(root / 'resumed'),
                              resume_jobs(DISTRIBUTED, straight_root))
    return straight_root, straight, resumed


@pytest.mark.parametrize('name', DISTRIBUTED)
def test_two_rank_resume_is_bit_identical(distributed, name):
    _, straight, resumed = distributed
    for rank in range(2):
        ref, got = straight[rank][name], resumed[rank][name]
        assert got['start']['iter'] == HALF
        # resumed with the state of step 5, not re-initialized
        assert_moved(name, ref['margin_half'])
        assert_same_buffers(got['margin_start'], ref['margin_half'])
        assert_same_run(got, ref)
    if name == 'elasticface':  # one draw per step, counted across the resume
        assert int(resumed[0][name]['margin_start']['draws']) == HALF
        assert int(resumed[0][name]['margin']['draws']) == RUN['max_iters']


@pytest.mark.parametrize('name', DISTRIBUTED)
def test_buffers_agree_on_every_rank(distributed, name):
    _, straight, resumed = distributed
    for runs in (straight, resumed):
        stages = ('margin_half', 'margin') if runs is straight else (
            'margin_start', 'margin')
        for stage in stages:
            first = runs[0][name][stage]
            for key, value in runs[1][name][stage].items():
                assert torch.equal(value, first[key]), (stage, key)


@pytest.fixture(scope='module')
def re_split(distributed, tmp_path_factory):
    """The 2-rank checkpoints at step 5 resumed on 1 rank, for one step."""
    straight_root, _, _ = distributed
    root = str(tmp_path_factory.mktemp('re_split'))
    return train_margins(0, 1, root, resume_jobs(
        DISTRIBUTED, straight_root, max_iters=HALF + 1))


@pytest.mark.parametrize('name', DISTRIBUTED)
def test_margin_state_survives_a_re_split(distributed, re_split, name):
    _, straight, _ = distributed
    one = re_split[name]
    assert one['start']['iter'] == HALF
    assert len(one['start']['weight']) == 10  # every class on one rank
    # the buffers 2 ranks held at step 5
    assert_same_buffers(one['margin_start'], straight[0][name]['margin_half'])
    if name == 'elasticface':  # the sequence goes on from there
        assert int(one['margin']['draws']) == HALF + 1


def test_one_rank_curricular_face_resume_is_bit_identical(tmp_path):
    name = 'curricularface'
    straight_root = str(tmp_path / 'straight')
    ref = train_margins(0, 1, straight_root, straight_jobs([name]))[name]
    got = train_margins(0, 1, str(tmp_path / 'resumed'),
                        resume_jobs([name], straight_root))[name]
    assert got['start']['iter'] == HALF
    assert_moved(name, ref['margin_half'])
    assert_same_buffers(got['margin_start'], ref['margin_half'])
    assert_same_run(got, ref)
