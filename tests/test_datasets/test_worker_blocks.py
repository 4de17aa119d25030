"""Reused shared-memory blocks of DataLoader workers: a block is written
again only once the main process has copied its batch out, and no batch the
main process holds changes when it is."""
import time
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401 (torch's reductions)

from mmpfc.datasets import face_collate
from mmpfc.datasets.worker_blocks import BlockPool, SharedBatch


def _through_a_worker_pipe(obj):
    """What the main process gets from a worker: torch's pickler shares
    the tensors' memory instead of copying it."""
    return ForkingPickler.loads(ForkingPickler.dumps(obj))


def test_a_block_comes_back_only_after_its_batch_is_copied_out():
    pool = BlockPool(max_blocks=2)
    first = pool.take(1000)
    second = pool.take(1000)  # the first is in flight: a new one
    assert first.data_ptr() != second.data_ptr()
    values = first[64:72].view(torch.int64)
    values.copy_(torch.arange(1, 2))
    batch = dict(labels=values, name='kept as is')
    got = _through_a_worker_pipe(SharedBatch(batch, [values]))
    assert got['name'] == 'kept as is'
    assert got['labels'].tolist() == [1]
    assert not got['labels'].is_shared()
    values.fill_(7)  # the worker writes the block again: the copy stays
    assert got['labels'].tolist() == [1]
    assert pool.take(1000).data_ptr() == first.data_ptr()  # came back
    third = pool.take(1000)  # both pooled blocks in flight: a third
    assert third.data_ptr() not in (first.data_ptr(), second.data_ptr())
    assert len(pool.blocks) == 2  # used once, not kept


def test_a_larger_batch_replaces_a_free_block_too_small():
    pool = BlockPool(max_blocks=2)
    busy = pool.take(100)
    small = pool.take(100)
    small[0] = 0  # handed back; the first stays in flight
    large = pool.take(10_000)
    assert large.numel() >= 10_000
    assert [b.data_ptr() for b in pool.blocks] == [busy.data_ptr(),
                                                   large.data_ptr()]


class _Numbered(torch.utils.data.Dataset):
    """Image i is filled with i % 251 and labelled i."""

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return dict(img=np.full((16, 16, 3), i % 251, np.uint8), gt_label=i)


def _collate_naming_the_block(samples):
    sent = face_collate(samples)
    assert isinstance(sent, dict)  # a collate wrapping it may add keys
    block = sent.tensors[0].untyped_storage().data_ptr()
    sent['block'] = (torch.utils.data.get_worker_info().id, block)
    return sent


@pytest.mark.parametrize('num_workers', [1, 2])
def test_held_batches_stay_intact_while_workers_reuse_blocks(num_workers):
    """The main process keeps every batch and is slow at first, so the
    workers fill their prefetch: were a block rewritten before its batch
    was copied out, the values would show it."""
    loader = torch.utils.data.DataLoader(
        _Numbered(), batch_size=8, num_workers=num_workers, prefetch_factor=3,
        collate_fn=_collate_naming_the_block)
    held, blocks = [], set()
    for step, batch in zip(range(40), loader):
        if step < 4:
            time.sleep(0.2)
        held.append(batch)
        blocks.add(batch['block'])
    for step, batch in enumerate(held):
        first = step * 8
        expected = torch.arange(first, first + 8)
        assert batch['data_samples'].tolist() == expected.tolist()
        want = (expected % 251).to(torch.uint8).view(8, 1, 1, 1)
        assert torch.equal(batch['inputs'], want.expand(8, 3, 16, 16))
    assert len(blocks) <= num_workers * 4  # reused, not one per batch
