"""tools/merge_checkpoint.py: one file with the full head, loadable on any
world size and resumable."""
import pytest
import torch
from helpers import load_tool
from messages import assert_mentions
from tiny_training import build_runner, head_state, make_cfg

from mmpfc.checkpoint import CheckpointError, CheckpointRows, load_file

#: the class rows of every rank of 10 classes on 2, 3 and 4 ranks (the
#: first 10 % W ranks one more), written out
SPLITS = {2: ((0, 5), (5, 10)), 3: ((0, 4), (4, 7), (7, 10)),
          4: ((0, 3), (3, 6), (6, 8), (8, 10))}


@pytest.fixture(scope='module')
def tool():
    return load_tool('merge_checkpoint.py').main


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('train')
    runner = build_runner(make_cfg(work_dir, max_iters=4, interval=4))
    runner.train()
    return work_dir, head_state(runner)


def test_merge_round_trip(tool, trained, tmp_path, capsys):
    work_dir, state = trained
    src, dst = str(work_dir / 'iter_4.pth'), str(tmp_path / 'merged.pth')
    assert tool([src, dst]) == 0
    assert 'head.weight: 10 x 120' in capsys.readouterr().out
    merged = load_file(dst)
    assert torch.equal(merged['state_dict']['head.weight'], state['weight'])
    manifest = merged['meta']['mmpfc']
    assert manifest['layout'] == 'inline' and manifest['shard_dir'] is None
    index = manifest['params']['head.weight']['optimizer'][1]
    assert torch.equal(merged['optimizer']['state'][index]['momentum_buffer'],
                       state['momentum'])

    # any world size: every rank's rows are the slice of its class range
    source = CheckpointRows(dst, merged)
    for split in SPLITS.values():
        for start, stop in split:
            weight, rows, _ = source.take('head.weight', start, stop)
            assert torch.equal(weight, state['weight'][start:stop])
            assert torch.equal(rows['momentum_buffer'],
                               state['momentum'][start:stop])

    # resumable: continues at iteration 4 with the same weights and momentum
    # (one more iteration: a resumed run that is complete trains nothing)
    runner = build_runner(make_cfg(tmp_path / 'resumed', max_iters=5,
                                   load_from=dst, resume=True))
    runner.train()
    start = runner.captured
    assert start['iter'] == 4
    assert torch.equal(start['weight'], state['weight'])
    assert torch.equal(start['momentum'], state['momentum'])


def test_merge_refuses_to_overwrite_and_bad_input(tool, trained, tmp_path,
                                                  capsys):
    work_dir, _ = trained
    src, dst = str(work_dir / 'iter_4.pth'), tmp_path / 'out.pth'
    dst.write_bytes(b'keep me')
    assert tool([src, str(dst)]) == 1
    assert_mentions(capsys.readouterr().err, str(dst), 'exists')
    assert dst.read_bytes() == b'keep me'
    assert tool([src, str(dst), '--overwrite', '--drop-optimizer']) == 0
    assert 'optimizer' not in load_file(str(dst))
    torch.save({'state_dict': {}}, tmp_path / 'plain.pth')
    assert tool([str(tmp_path / 'plain.pth'), str(tmp_path / 'x.pth')]) == 1
    assert_mentions(capsys.readouterr().err, str(tmp_path / 'plain.pth'),
                    'meta["mmpfc"]', 'not a sharded checkpoint')
    from mmpfc.checkpoint.merge import merge_checkpoint
    with pytest.raises(CheckpointError) as err:
        merge_checkpoint(src, src)
    assert_mentions(err, src, 'onto itself')
