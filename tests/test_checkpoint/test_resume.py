"""Resume on 2 gloo ranks: bit-identical to training straight through, the
log continues at the right step and lr; resume on 1 and 3 ranks re-splits
the centers and their momentum by class id."""
import glob
import json
import os.path as osp
import shutil

import pytest
import torch
from dist_utils import run_distributed
from messages import assert_in_order, assert_mentions
from tiny_training import (NUM_CLASSES, build_runner, check_shard_dirs,
                           make_cfg, train_worker)

from mmpfc.checkpoint import (CheckpointError, CheckpointRows,
                              ShardedCheckpointer, load_file, unwrap_model)
from mmpfc.checkpoint.merge import merge_checkpoint

STRAIGHT = dict(max_iters=20, interval=5, max_keep_ckpts=3, sample_rate=0.5)


def scalars(work_dir):
    """Logged scalars by step (the JSON log of the LoggerHook)."""
    rows = {}
    for path in glob.glob(osp.join(work_dir, '*', 'vis_data',
                                   'scalars.json')):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                rows[row['step']] = row
    return rows


def saved_head(path):
    """Full (C, D) weight and momentum at a checkpoint, from its shards."""
    source = CheckpointRows(path, load_file(path))
    entry = source.describe('head.weight')
    weight, rows, _ = source.take('head.weight', 0, entry['num_classes'])
    return weight, rows['momentum_buffer']


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    """2 ranks, 20 iterations, checkpoints every 5, the last 3 kept."""
    work_dir = str(tmp_path_factory.mktemp('straight'))
    return work_dir, run_distributed(train_worker, 2, work_dir, STRAIGHT)


def test_every_shard_saved_and_old_ones_removed(straight):
    work_dir, _ = straight
    names = check_shard_dirs(work_dir,
                             ['iter_10.pth', 'iter_15.pth', 'iter_20.pth'])
    assert not osp.exists(osp.join(work_dir, 'iter_5.pth'))
    for name in names:
        assert sorted(map(osp.basename, glob.glob(
            osp.join(work_dir, name, '*')))) == ['rank0-of2.pth',
                                                 'rank1-of2.pth']


def test_exact_resume_on_same_world_size(straight, tmp_path):
    work_dir, reference = straight
    resumed = run_distributed(
        train_worker, 2, str(tmp_path), dict(
            STRAIGHT, load_from=osp.join(work_dir, 'iter_10.pth'),
            resume=True))
    for rank in range(2):
        ref, got = reference[rank]['final'], resumed[rank]['final']
        assert resumed[rank]['start']['iter'] == 10
        assert got['iter'] == ref['iter'] == 20
        assert torch.equal(got['weight'], ref['weight'])
        assert torch.equal(got['momentum'], ref['momentum'])
        for key, value in ref['backbone'].items():
            assert torch.equal(got['backbone'][key], value), key
        assert torch.equal(got['sampler']['generator'],
                           ref['sampler']['generator'])
    logged, straight_log = scalars(str(tmp_path)), scalars(work_dir)
    assert sorted(logged) == list(range(11, 21))
    for step in range(11, 21):
        for key in ('lr', 'loss', 'grad_norm'):
            assert logged[step][key] == straight_log[step][key], (step, key)


def test_resume_on_other_world_sizes(straight, tmp_path):
    """2 -> 1 and 2 -> 3 ranks: rows and momentum re-split exactly; the
    next optimizer steps agree (model parallel, sample_rate=1)."""
    work_dir, _ = straight
    ckpt = osp.join(work_dir, 'iter_10.pth')
    weight, momentum = saved_head(ckpt)
    merged = str(tmp_path / 'merged.pth')
    merge_checkpoint(ckpt, merged)
    kwargs = dict(STRAIGHT, max_iters=12, sample_rate=1.0, load_from=ckpt,
                  resume=True)
    one = run_distributed(train_worker, 1, str(tmp_path / 'w1'), kwargs)
    three = run_distributed(train_worker, 3, str(tmp_path / 'w3'), kwargs,
                            merged)
    for result in one + three:
        start, stop = result['start']['class_start'], \
            result['start']['class_start'] + len(result['start']['weight'])
        assert torch.equal(result['start']['weight'], weight[start:stop])
        assert torch.equal(result['start']['momentum'],
                           momentum[start:stop])
    assert [len(r['start']['weight']) for r in three] == [4, 3, 3]
    final = torch.cat([r['final']['weight'] for r in three])
    diff = (final - one[0]['final']['weight']).abs().max().item()
    print(f'max |W(3 ranks) - W(1 rank)| after 2 steps: {diff:.2e}')
    assert diff < 1e-5
    assert not torch.equal(final, weight)  # the steps did change them
    for key, value in one[0]['final']['backbone'].items():
        torch.testing.assert_close(three[0]['final']['backbone'][key], value,
                                   rtol=1e-4, atol=1e-5)
    for result in three:  # the merged file loads on 3 ranks too
        loaded = result['loaded']
        start = loaded['class_start']
        assert torch.equal(loaded['weight'],
                           weight[start:start + len(loaded['weight'])])


def test_incomplete_checkpoint_names_missing_shard(straight, tmp_path):
    work_dir, _ = straight
    main = osp.join(work_dir, 'iter_15.pth')
    manifest = load_file(main)['meta']['mmpfc']
    shutil.copy(main, tmp_path)
    shutil.copytree(osp.join(work_dir, manifest['shard_dir']),
                    tmp_path / manifest['shard_dir'])
    (tmp_path / manifest['shard_dir'] / 'rank1-of2.pth').unlink()
    copy = str(tmp_path / 'iter_15.pth')
    with pytest.raises(CheckpointError) as err:
        CheckpointRows(copy, load_file(copy))
    text = assert_mentions(err, copy, '1 of 2 shard files missing',
                           str(tmp_path / manifest['shard_dir']),
                           'rank1-of2.pth')
    assert 'rank0-of2.pth' not in text  # the one there is not named


def test_adamw_state_of_sampled_centers_resumes_on_other_world_size(
        tmp_path):
    """Partial FC with AdamW: the moments and per-row step counts of every
    center are saved by their rank and re-split by class id (2 -> 3)."""
    kwargs = dict(max_iters=6, interval=6, sample_rate=0.5,
                  optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.1))
    first = str(tmp_path / 'w2')
    trained = run_distributed(train_worker, 2, first, kwargs)
    saved = torch.cat([r['final']['optimizer_state']['row_step']
                       for r in trained])
    assert 0 < saved.min() and saved.max() <= 6  # sampled some steps only
    source = CheckpointRows(osp.join(first, 'iter_6.pth'),
                            load_file(osp.join(first, 'iter_6.pth')))
    _, rows, _ = source.take('head.weight', 0, NUM_CLASSES)
    assert sorted(rows) == ['exp_avg', 'exp_avg_sq', 'row_step']
    assert torch.equal(rows['row_step'], saved)
    three = run_distributed(
        train_worker, 3, str(tmp_path / 'w3'),
        dict(kwargs, max_iters=7, load_from=osp.join(first, 'iter_6.pth'),
             resume=True))
    for result in three:
        start = result['start']['class_start']
        got = result['start']['optimizer_state']
        for key, value in rows.items():
            assert torch.equal(got[key], value[start:start + len(got[key])])


def test_exact_resume_reproduces_dropout(tmp_path):
    """Each rank's random state is saved with its shard and put back before
    the first iteration after a resume: a model with dropout resumes
    bit-identically (MMEngine alone re-seeds and draws other masks)."""
    kwargs = dict(max_iters=8, interval=4, sample_rate=0.5,
                  neck=dict(type='GapDropoutNeck', p=0.5))
    straight_dir = str(tmp_path / 'straight')
    straight = run_distributed(train_worker, 2, straight_dir, kwargs)
    resumed = run_distributed(
        train_worker, 2, str(tmp_path / 'resumed'),
        dict(kwargs, load_from=osp.join(straight_dir, 'iter_4.pth'),
             resume=True))
    for rank in range(2):
        ref, got = straight[rank]['final'], resumed[rank]['final']
        assert resumed[rank]['start']['iter'] == 4
        assert torch.equal(got['weight'], ref['weight'])
        for key, value in ref['backbone'].items():
            assert torch.equal(got['backbone'][key], value), key


def test_resume_with_another_optimizer_type_explains_itself(tmp_path):
    """SGD state resumed by AdamW: torch alone fails with KeyError 'step'."""
    first = str(tmp_path / 'sgd')
    build_runner(make_cfg(first, max_iters=2, interval=2)).train()
    ckpt = osp.join(first, 'iter_2.pth')
    runner = build_runner(make_cfg(
        str(tmp_path / 'adamw'), max_iters=4, load_from=ckpt, resume=True,
        optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.1)))
    with pytest.raises(CheckpointError) as err:
        runner.train()
    # the saved settings, this run's, and the way out
    assert_in_order(
        err, ckpt, "['dampening', 'lr', 'momentum', 'nesterov', "
        "'weight_decay']", 'AdamW', "['amsgrad', 'betas', 'eps', 'lr', "
        "'weight_decay']", 'load_from=PATH', 'resume=False')
    # the weights alone still start a new AdamW run
    build_runner(make_cfg(str(tmp_path / 'adamw2'), max_iters=1,
                          load_from=ckpt, optimizer=dict(
                              type='AdamW', lr=1e-3))).train()


def load_result_worker(rank, world_size, work_dir, path):
    """What ``ShardedCheckpointer.load`` says applies to this rank."""
    runner = build_runner(make_cfg(work_dir, world_size=world_size,
                                   **STRAIGHT))
    model = unwrap_model(runner.model)
    result = ShardedCheckpointer().load(model, runner.optim_wrapper, path,
                                        load_file(path, mmap=True))
    return result, model.head.weight.detach().clone()


def test_load_result_on_the_saving_world_size(straight, tmp_path):
    """2 -> 2 ranks: every rank takes its own rows back, and the sampler
    and random state its rank saved."""
    work_dir, _ = straight
    path = osp.join(work_dir, 'iter_10.pth')
    weight, _ = saved_head(path)
    loaded = run_distributed(load_result_worker, 2, str(tmp_path), path)
    for rank, (result, rows) in enumerate(loaded):
        start, stop = (0, 5) if rank == 0 else (5, 10)
        assert (result.layout, result.saved_world_size) == ('shards', 2)
        assert result.rows == {'head.weight': (start, stop)}
        assert result.split_matched
        assert sorted(result.sampler_states) == ['head']
        assert result.rng_state is not None
        assert torch.equal(rows, weight[start:stop])
    # each rank's sampler state as its shard file holds it
    shard_dir = osp.join(work_dir, load_file(path)['meta']['mmpfc'][
        'shard_dir'])
    saved = [torch.load(osp.join(shard_dir, f'rank{rank}-of2.pth'),
                        weights_only=False)['samplers']['head']
             for rank in range(2)]
    seeds = [result.sampler_states['head']['seed'] for result, _ in loaded]
    assert seeds == [state['seed'] for state in saved]
    assert seeds[0] != seeds[1]  # each rank its own rank's stream


def test_load_result_after_a_re_split(straight, tmp_path):
    """2 -> 1 rank: all rows fitted, but no rank's sampler or random state
    applies (the samplers are reseeded by resume)."""
    work_dir, _ = straight
    path = osp.join(work_dir, 'iter_10.pth')
    weight, _ = saved_head(path)
    result, rows = load_result_worker(0, 1, str(tmp_path), path)
    assert (result.layout, result.saved_world_size) == ('shards', 2)
    assert result.rows == {'head.weight': (0, NUM_CLASSES)}
    assert not result.split_matched
    assert result.sampler_states is None and result.rng_state is None
    assert torch.equal(rows, weight)
