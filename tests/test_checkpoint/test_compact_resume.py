"""bf16 centers with int8 momentum: checkpoints keep the compact forms,
resume bit-identically on 2 ranks (rounding streams included), re-split
exactly on 1 and 3 ranks, and merge to fp32 or keep the dtype."""
import os.path as osp

import pytest
import torch
from dist_utils import run_distributed
from tiny_training import NUM_CLASSES, train_worker

from mmpfc.checkpoint import CheckpointRows, load_file
from mmpfc.checkpoint.merge import merge_checkpoint

COMPACT = dict(max_iters=10, interval=5, sample_rate=0.5,
               center_dtype='bfloat16', center_state_dtype='int8')
ROW_KEYS = ('momentum_buffer', 'momentum_buffer_absmax')


@pytest.fixture(scope='module')
def compact_straight(tmp_path_factory):
    work_dir = str(tmp_path_factory.mktemp('compact'))
    return work_dir, run_distributed(train_worker, 2, work_dir, COMPACT)


def saved_rows(path):
    """All C rows of the head and its row-wise optimizer state."""
    source = CheckpointRows(path, load_file(path))
    weight, rows, _ = source.take('head.weight', 0, NUM_CLASSES)
    return source, weight, rows


def test_shards_keep_the_compact_forms(compact_straight):
    work_dir, trained = compact_straight
    source, weight, rows = saved_rows(osp.join(work_dir, 'iter_10.pth'))
    assert weight.dtype == torch.bfloat16
    assert rows['momentum_buffer'].dtype == torch.int8
    assert rows['momentum_buffer_absmax'].dtype == torch.float32
    assert source.describe('head.weight')['dtype'] == 'bfloat16'
    final = torch.cat([r['final']['weight'] for r in trained])
    assert torch.equal(weight, final)
    for rank in range(2):  # each rank's rounding stream is in its shard
        saved = source.rounding_states(rank)['head']
        assert torch.equal(saved['generator'],
                           trained[rank]['final']['rounding']['generator'])


def test_exact_resume_with_compact_forms(compact_straight, tmp_path):
    work_dir, reference = compact_straight
    resumed = run_distributed(
        train_worker, 2, str(tmp_path), dict(
            COMPACT, load_from=osp.join(work_dir, 'iter_5.pth'),
            resume=True))
    for rank in range(2):
        ref, got = reference[rank]['final'], resumed[rank]['final']
        assert resumed[rank]['start']['iter'] == 5 and got['iter'] == 10
        assert torch.equal(got['weight'], ref['weight'])
        for key in ROW_KEYS:
            assert torch.equal(got['optimizer_state'][key],
                               ref['optimizer_state'][key]), key
        assert torch.equal(got['rounding']['generator'],
                           ref['rounding']['generator'])


def test_compact_forms_re_split_and_merge(compact_straight, tmp_path):
    """2 -> 1 and 2 -> 3 ranks take the saved bf16 rows and int8 codes by
    class id; a merge writes the centers in fp32 (exactly) unless told to
    keep their dtype."""
    work_dir, _ = compact_straight
    ckpt = osp.join(work_dir, 'iter_5.pth')
    _, weight, rows = saved_rows(ckpt)
    kwargs = dict(COMPACT, max_iters=6, load_from=ckpt, resume=True)
    one = run_distributed(train_worker, 1, str(tmp_path / 'w1'), kwargs)
    three = run_distributed(train_worker, 3, str(tmp_path / 'w3'), kwargs)
    assert [len(r['start']['weight']) for r in three] == [4, 3, 3]
    for result in one + three:
        start = result['start']['class_start']
        stop = start + len(result['start']['weight'])
        assert result['start']['weight'].dtype == torch.bfloat16
        assert torch.equal(result['start']['weight'], weight[start:stop])
        for key in ROW_KEYS:
            assert torch.equal(result['start']['optimizer_state'][key],
                               rows[key][start:stop]), key
        assert result['final']['iter'] == 6
    merged = str(tmp_path / 'merged.pth')
    merge_checkpoint(ckpt, merged)
    full = load_file(merged)['state_dict']['head.weight']
    assert full.dtype == torch.float32 and torch.equal(full, weight.float())
    kept = str(tmp_path / 'kept.pth')
    merge_checkpoint(ckpt, kept, keep_dtype=True)
    checkpoint = load_file(kept)
    assert torch.equal(checkpoint['state_dict']['head.weight'], weight)
    assert CheckpointRows(kept, checkpoint).describe(
        'head.weight')['dtype'] == 'bfloat16'
