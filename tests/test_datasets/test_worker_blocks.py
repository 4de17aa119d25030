"""Reused shared-memory blocks of DataLoader workers: a block is written
again only once the main process has copied its batch out and nothing there
points into it, and no batch the main process holds changes when it is."""
import time

import numpy as np
import pytest
import torch

from mmpfc.datasets import encoded_face_collate, face_collate, worker_blocks
from mmpfc.datasets.worker_blocks import BlockPool


def _hand_back(block):
    block[0] = 0  # what the main process does once it has copied it out


def test_pool_reuses_only_blocks_handed_back():
    pool = BlockPool(max_blocks=2)
    first = pool.take(1000)
    second = pool.take(1000)  # the first is in flight: a new one
    assert first.data_ptr() != second.data_ptr()
    _hand_back(first)
    assert pool.take(1000).data_ptr() == first.data_ptr()
    third = pool.take(1000)  # both pooled blocks in flight: a third
    assert third.data_ptr() not in (first.data_ptr(), second.data_ptr())
    assert len(pool.blocks) == 2 and pool.allocated == 3  # used once


def test_a_larger_batch_replaces_a_free_block_too_small():
    pool = BlockPool(max_blocks=2)
    busy = pool.take(100)
    small = pool.take(100)
    _hand_back(small)  # the first stays in flight
    large = pool.take(10_000)
    assert large.numel() >= 10_000
    assert [b.data_ptr() for b in pool.blocks] == [busy.data_ptr(),
                                                   large.data_ptr()]


def test_pool_warns_once_when_no_block_comes_back(monkeypatch):
    monkeypatch.setattr(worker_blocks, '_WARN_AFTER', 3)
    pool = BlockPool(max_blocks=1)
    with pytest.warns(UserWarning) as caught:
        for _ in range(8):
            pool.take(100)
    assert len(caught) == 1
    assert 'must return the dict' in str(caught[0].message)


class _Numbered(torch.utils.data.Dataset):
    """Image i is filled with i % 251, its bytes are i's digits, its label
    is i."""

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return dict(img=np.full((16, 16, 3), i % 251, np.uint8), gt_label=i,
                    img_bytes=str(i).encode(), flip=i % 3 == 0)


#: Shared blocks made in this process (a forked worker counts its own).
_MADE = [0]


@pytest.fixture
def count_blocks(monkeypatch):
    """Count the shared blocks the workers make (they fork from here)."""
    make = worker_blocks._shared_block

    def counted(nbytes):
        _MADE[0] += 1
        return make(nbytes)
    monkeypatch.setattr(worker_blocks, '_shared_block', counted)


def _allocated():
    return _MADE[0]


def _decoded(samples):
    sent = face_collate([{k: s[k] for k in ('img', 'gt_label')}
                         for s in samples])
    assert isinstance(sent, dict)  # a collate wrapping it may add keys
    sent['allocated'] = _allocated()
    return sent


def _encoded(samples):
    sent = encoded_face_collate([{k: v for k, v in s.items() if k != 'img'}
                                 for s in samples])
    sent['allocated'] = _allocated()
    return sent


def _check(batch, step, size=8):
    labels = torch.arange(step * size, (step + 1) * size)
    assert batch['data_samples'].tolist() == labels.tolist()
    inputs = batch['inputs']
    if torch.is_tensor(inputs):
        want = (labels % 251).to(torch.uint8).view(-1, 1, 1, 1)
        assert torch.equal(inputs, want.expand(-1, 3, 16, 16))
    else:
        assert [bytes(b.numpy()) for b in inputs.images()] == [
            str(i).encode() for i in labels.tolist()]
        assert inputs.flip.tolist() == (labels % 3 == 0).tolist()
    assert not any(t.is_shared() for t in _tensors(batch))


def _tensors(batch):
    inputs = batch['inputs']
    tensors = [inputs] if torch.is_tensor(inputs) else [
        inputs.data, inputs.lengths, inputs.flip]
    return tensors + [batch['data_samples']]


def _held_batches(collate, num_workers, steps=40, prefetch_factor=5):
    """Every batch kept; the main process slow at first, so the workers
    fill their prefetch (the blocks in flight)."""
    loader = torch.utils.data.DataLoader(
        _Numbered(), batch_size=8, num_workers=num_workers,
        prefetch_factor=prefetch_factor, collate_fn=collate)
    held = []
    for step, batch in zip(range(steps), loader):
        if step < 3:
            time.sleep(0.3)
        held.append(batch)
    return held


@pytest.mark.parametrize('collate,num_workers',
                         [(_decoded, 1), (_decoded, 2), (_encoded, 1)])
def test_held_batches_stay_intact_while_workers_reuse_blocks(
        collate, num_workers, count_blocks):
    """Were a block rewritten before its batch was copied out, the values
    would show it; were blocks not reused, each batch would make one."""
    held = _held_batches(collate, num_workers)
    for step, batch in enumerate(held):
        _check(batch, step)
    # at most the prefetched batches, one in transit and one being written
    assert max(b['allocated'] for b in held) <= 5 + 2


def _with_views(samples):
    sent = _decoded(samples)
    sent['first_labels'] = sent['data_samples'][:2]  # a view of the block
    sent['first_image'] = sent['inputs'][0]
    return sent


def test_a_view_of_the_block_keeps_it_from_coming_back():
    held = _held_batches(_with_views, 1)
    for step, batch in enumerate(held):
        _check(batch, step)
        assert batch['first_labels'].tolist() == [step * 8, step * 8 + 1]
        assert int(batch['first_image'].unique()) == step * 8 % 251


def test_the_block_is_handed_back_only_after_the_copy(monkeypatch,
                                                      count_blocks):
    flags = []
    copy = worker_blocks._private_copy

    def watched(shared):
        flags.append(int(torch.empty(0, dtype=torch.uint8).set_(shared)[0]))
        return copy(shared)
    monkeypatch.setattr(worker_blocks, '_private_copy', watched)
    held = _held_batches(_decoded, 1, steps=12)
    for step, batch in enumerate(held):
        _check(batch, step)
    assert flags == [1] * 12  # still in flight while it was copied
    assert max(b['allocated'] for b in held) < 12  # and then handed back
