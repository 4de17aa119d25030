"""Checksums of checkpoint files: recorded when written (the shards' in the
manifest, the main file's in ``<main>.pth.sum``), verified on load and by
tools/merge_checkpoint.py; one flipped byte is refused by name. Expected
checksums are computed here with ``xxhash`` over the bytes on disk, from
the algorithm's definition."""
import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
import xxhash
from helpers import load_tool
from messages import assert_in_order, assert_mentions
from tiny_training import build_runner, make_cfg

from mmpfc.checkpoint import (CheckpointError, ShardedCheckpointer,
                              file_checksum, load_file,
                              remove_stale_shard_dirs)

PART = 64 * 2**20


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-rank run of 4 iterations, checkpoints at 2 and 4."""
    work_dir = tmp_path_factory.mktemp('ckpt')
    build_runner(make_cfg(work_dir)).train()
    return work_dir


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the trained work dir to damage."""
    return shutil.copytree(trained, tmp_path / 'copy')


@pytest.fixture(scope='module')
def merge_tool():
    return load_tool('merge_checkpoint.py').main


def checksum_of(data: bytes) -> str:
    """'xxh3tree': XXH3-64 of the XXH3-64 digests of the 64 MiB parts."""
    parts = [data[i:i + PART] for i in range(0, max(len(data), 1), PART)]
    digests = b''.join(xxhash.xxh3_64(p).digest() for p in parts)
    return f'xxh3tree:{xxhash.xxh3_64(digests).hexdigest()}'


def on_disk(path) -> str:
    return checksum_of(path.read_bytes())


@pytest.mark.parametrize('size', [0, 1000, PART, 2 * PART + 17])
def test_file_checksum_follows_the_definition_on_any_threads(
        tmp_path, size):
    data = np.random.default_rng(0).bytes(size)
    path = tmp_path / 'f.bin'
    path.write_bytes(data)
    want = checksum_of(data)
    assert [file_checksum(str(path), n) for n in (1, 2, 3)] == [want] * 3


def manifest_of(main):
    return load_file(str(main))['meta']['mmpfc']


def shard_of(main):
    return main.parent / manifest_of(main)['shard_dir'] / 'rank0-of1.pth'


def flip_byte_of(path, tensor: torch.Tensor) -> None:
    """Flip one bit in the stored bytes of ``tensor`` (same size): a
    damage ``torch.load`` cannot notice."""
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.numpy().tobytes())
    assert at > 0
    data[at + 7] ^= 0x10
    path.write_bytes(bytes(data))


def corrupt_parts(path, found, expected, recorded_in, work_dir) -> tuple:
    """What a checksum error names: the file, both checksums, where the
    expected one was recorded, and the previous checkpoint to resume."""
    return (str(path), 'corrupt', found, expected, recorded_in,
            f"--resume {work_dir / 'iter_2.pth'}")


def test_recorded_checksums_are_those_of_the_bytes_on_disk(trained,
                                                           tmp_path):
    main = trained / 'iter_4.pth'
    assert manifest_of(main)['shard_checksums'] == [on_disk(shard_of(main))]
    record = json.loads((trained / 'iter_4.pth.sum').read_text())
    assert record == dict(file='iter_4.pth', bytes=main.stat().st_size,
                          checksum=on_disk(main))
    # a merged file gets its own
    from mmpfc.checkpoint.merge import merge_checkpoint
    merged = tmp_path / 'merged.pth'
    merge_checkpoint(str(main), str(merged))
    record = json.loads((tmp_path / 'merged.pth.sum').read_text())
    assert record['checksum'] == on_disk(merged)


def _fresh_runner(tmp_path):
    runner = build_runner(make_cfg(tmp_path / 'new'))
    return runner, runner.model.head.weight.detach().clone()


def test_a_flipped_byte_in_a_shard_is_refused_on_load(copy, tmp_path):
    main = copy / 'iter_4.pth'
    shard = shard_of(main)
    expected = manifest_of(main)['shard_checksums'][0]
    flip_byte_of(shard, load_file(str(shard))['params']['head.weight'][
        'weight'])
    found = on_disk(shard)
    assert found != expected
    load_file(str(shard))  # readable: only the checksum tells
    parts = ('shard of rank 0', ) + corrupt_parts(shard, found, expected,
                                                  'manifest', copy)
    runner, before = _fresh_runner(tmp_path)
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(main))
    assert_mentions(err, *parts)
    assert_in_order(err, found, expected)
    assert torch.equal(runner.model.head.weight.detach(), before)
    resumed = build_runner(make_cfg(tmp_path / 'resumed', max_iters=6,
                                    load_from=str(main), resume=True))
    with pytest.raises(CheckpointError) as err:
        resumed.train()
    assert_mentions(err, *parts)


def test_a_flipped_byte_in_the_main_file_is_refused_on_load(copy,
                                                            tmp_path):
    main = copy / 'iter_4.pth'
    expected = on_disk(main)
    flip_byte_of(main, load_file(str(main))['state_dict'][
        'backbone.features.0.weight'])
    sidecar = f'{main}.sum'
    runner, _ = _fresh_runner(tmp_path)
    with pytest.raises(CheckpointError) as err:
        runner.load_checkpoint(str(main))
    # and the way out for a file changed on purpose: delete its sidecar
    assert_mentions(err, *corrupt_parts(main, on_disk(main), expected,
                                        sidecar, copy), f'delete {sidecar}')
    assert_in_order(err, on_disk(main), expected)
    os.remove(sidecar)  # as the message says: loads unchecked
    runner.load_checkpoint(str(main))


@pytest.mark.parametrize('damaged', ['shard', 'main'])
def test_merge_refuses_a_flipped_byte(copy, tmp_path, merge_tool, capsys,
                                      damaged):
    main = copy / 'iter_4.pth'
    path, key = (shard_of(main), 'params') if damaged == 'shard' else (
        main, 'state_dict')
    expected = on_disk(path)
    tensors = load_file(str(path))[key]
    flip_byte_of(path, tensors['head.weight']['weight'] if damaged ==
                 'shard' else tensors['backbone.features.0.weight'])
    dst = tmp_path / 'merged.pth'
    assert merge_tool([str(main), str(dst)]) == 1
    err = capsys.readouterr().err
    assert_mentions(err, str(path), 'corrupt')
    assert_in_order(err, on_disk(path), expected)
    assert not dst.exists() and not (tmp_path / 'merged.pth.sum').exists()


def test_a_checkpoint_saved_before_checksums_loads_with_a_note(
        copy, tmp_path, merge_tool, capsys, caplog):
    main = copy / 'iter_4.pth'
    checkpoint = load_file(str(main))
    del checkpoint['meta']['mmpfc']['shard_checksums']
    torch.save(checkpoint, main)
    os.remove(f'{main}.sum')
    runner, _ = _fresh_runner(tmp_path)
    with caplog.at_level(logging.INFO, 'mmpfc.checkpoint.checkpointer'):
        ShardedCheckpointer().load(runner.model, runner.optim_wrapper,
                                   str(main), load_file(str(main)))
    notes = caplog.messages
    assert any(str(main) in m and 'no checksum' in m and 'iter_4.pth.sum'
               in m for m in notes), notes
    assert any(str(main) in m and 'no checksums' in m and 'shard' in m
               for m in notes), notes
    runner.load_checkpoint(str(main))  # through the runner too
    assert merge_tool([str(main), str(tmp_path / 'merged.pth')]) == 0
    err = capsys.readouterr().err
    assert 'note: ' in err and 'checked by size only' in err


def test_stale_checksum_files_are_removed(tmp_path):
    (tmp_path / 'iter_1.pth.sum').write_text('{}')  # main file gone
    (tmp_path / '.iter_1.pth.sum.k3y_9.tmp').write_text('')  # interrupted
    (tmp_path / 'iter_3.pth').write_bytes(b'x')
    (tmp_path / 'iter_3.pth.sum').write_text('{}')  # kept
    removed = remove_stale_shard_dirs(str(tmp_path))
    assert sorted(removed) == ['.iter_1.pth.sum.k3y_9.tmp',
                               'iter_1.pth.sum']
    assert sorted(os.listdir(tmp_path)) == ['iter_3.pth', 'iter_3.pth.sum']
