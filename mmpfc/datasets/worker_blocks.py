"""Batch memory that DataLoader workers reuse instead of allocating it anew.

A worker sends a batch to the main process in shared memory. A fresh block
per batch costs more than packing the batch: every page of it is allocated,
zeroed and faulted in on first write (measured here: ~4.5 ms of a 128-image
112x112 batch, more than a quarter of the worker's time). So each worker
keeps a few blocks (:class:`BlockPool`) and writes a batch into one that has
come back. A block comes back when the main process has copied the batch
out of it: the batch is sent as :class:`SharedBatch`, which unpickles there
as the plain batch with its tensors moved into the main process's own
memory, and clears the block's in-flight flag after the copy unless
something else there still points into the block (a view a wrapping collate
added): such a block stays in flight, so a block is rewritten only when
nothing in the main process can read it, whatever the training loop keeps.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import get_worker_info

#: Bytes before a block's first tensor: its in-flight flag (byte 0), padded
#: to a cache line, which is also the alignment of each tensor in it.
_HEADER = _ALIGN = 64
_FREE, _IN_FLIGHT = 0, 1
#: Orders the main process's copy out of a block before the store of the
#: flag that hands the block back: the copy ends in a release of this lock
#: and the store follows an acquire, and a release followed by an acquire
#: is not reordered (x86, ARMv8), which a plain store after a copy may be.
_ORDER = threading.Lock()
#: Batches in a row after which a worker whose blocks never come back says
#: so (once).
_WARN_AFTER = 64


class BlockPool:
    """A worker's shared-memory blocks for its batches.

    ``take`` gives a block that is not in flight, large enough, flagged in
    flight; it allocates one when none is free. At most ``max_blocks`` are
    kept (a worker has up to ``prefetch_factor`` batches queued, and one
    in transit); beyond that a block is used once, as torch's
    ``default_collate`` does with every batch. A block whose batch never
    reaches the main process as a :class:`SharedBatch`, or whose memory a
    view there still holds, stays flagged and is not reused; when none has
    come back for many batches in a row the pool warns once.
    """

    def __init__(self, max_blocks: int = 8) -> None:
        self.max_blocks = max_blocks
        self.blocks: List[torch.Tensor] = []  # uint8, flag at byte 0
        self.allocated = 0  # blocks made, pooled or not
        self._not_back = 0  # takes in a row that found every block out

    def take(self, nbytes: int) -> torch.Tensor:
        free = [b for b in self.blocks if int(b[0]) == _FREE]
        block = next((b for b in free if b.numel() >= nbytes), None)
        if block is None:
            if free:  # all too small: a larger one takes the place of one
                self.blocks = [b for b in self.blocks if b is not free[0]]
            # room for batches a little larger (encoded bytes vary)
            block = _shared_block(nbytes + nbytes // 8)
            self.allocated += 1
            if len(self.blocks) < self.max_blocks:
                self.blocks.append(block)
            elif not free:
                self._count_not_back()
        else:
            self._not_back = 0
        block[0] = _IN_FLIGHT
        return block

    def _count_not_back(self) -> None:
        self._not_back += 1
        if self._not_back == _WARN_AFTER:
            warnings.warn(
                f'mmpfc: none of this DataLoader worker\'s {self.max_blocks} '
                f'shared batch blocks came back in {_WARN_AFTER} batches, so '
                'each batch takes a fresh block (slower, not wrong). A '
                'collate that wraps face_collate / encoded_face_collate must '
                'return the dict they return (adding keys to it), and keep '
                'no views of its tensors in other keys')


def _shared_block(nbytes: int) -> torch.Tensor:
    empty = torch.empty(0, dtype=torch.uint8)
    return empty.new(empty._typed_storage()._new_shared(max(nbytes, 1)))


#: This worker process's pool, by process id (a process forked from a
#: worker starts its own); nothing is kept in a process that is not a worker.
_POOL: Dict[int, BlockPool] = {}


def _worker_pool() -> Optional[BlockPool]:
    if get_worker_info() is None:
        return None
    pid = os.getpid()
    if pid not in _POOL:
        _POOL.clear()
        _POOL[pid] = BlockPool()
    return _POOL[pid]


def batch_tensors(*parts: Tuple[Tuple[int, ...], torch.dtype]
                  ) -> List[torch.Tensor]:
    """Uninitialized contiguous tensors of the given (shape, dtype), side by
    side in one block of memory.

    In a DataLoader worker the block is one of the worker's reusable shared
    blocks; return the batch through :func:`send_batch` so that the block
    comes back. A batch in one block also travels as one: each block is one
    more file descriptor handed to the main process and mapped there (about
    0.4 ms per block here).
    """
    spans, total = [], _HEADER  # (first byte, bytes) of each part
    for shape, dtype in parts:
        total = -(-total // _ALIGN) * _ALIGN
        spans.append((total, math.prod(shape) * dtype.itemsize))
        total += spans[-1][1]
    pool = _worker_pool()
    block = torch.empty(total, dtype=torch.uint8) if pool is None \
        else pool.take(total)
    return [block[start:start + size].view(dtype).view(shape)
            for (start, size), (shape, dtype) in zip(spans, parts)]


def send_batch(batch: dict, tensors: Sequence[torch.Tensor]) -> dict:
    """``batch`` as the collate's result: in a worker a :class:`SharedBatch`
    (``tensors`` are those :func:`batch_tensors` gave, all in ``batch``),
    elsewhere ``batch`` itself."""
    if get_worker_info() is None:
        return batch
    return SharedBatch(batch, tensors)


class SharedBatch(dict):
    """A worker's batch (a dict, which a collate wrapping this one may
    still change) whose ``tensors`` are views of one pooled block.

    Pickled to the main process it unpickles as a plain dict of the same
    items, its ``tensors`` moved into the main process's memory (one copy
    of the block, the same offsets and strides), and the block handed back
    to the worker. Pickle keeps the identity of objects, so ``tensors`` are
    the very tensors inside the batch there too.
    """

    def __init__(self, batch: dict, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__(batch)
        self.tensors = list(tensors)

    def __reduce__(self) -> tuple:
        return _copy_out, (dict(self), self.tensors)


def _copy_out(batch: dict, tensors: List[torch.Tensor]) -> dict:
    """The batch, in the main process, with ``tensors`` moved out of their
    shared block; the block handed back if nothing else points into it."""
    if not tensors:
        return batch
    shared = tensors[0].untyped_storage()
    with _ORDER:
        own = _private_copy(shared)
        for t in tensors:
            t.set_(own, t.storage_offset(), t.shape, t.stride())
    with _ORDER:
        if _only_reference(shared):
            torch.empty(0, dtype=torch.uint8).set_(shared, 0, (1, ))[0] = \
                _FREE
    return batch


def _private_copy(shared: torch.UntypedStorage) -> torch.UntypedStorage:
    """A copy of ``shared`` in this process's memory: page-locked once CUDA
    is in use here (the copy to the GPU, or the DataLoader's pinning, then
    needs no second copy). A tensor copy lets other threads run meanwhile
    (a storage's does not)."""
    own = torch.empty(shared.nbytes(), dtype=torch.uint8,
                      pin_memory=torch.cuda.is_initialized())
    own.copy_(torch.empty(0, dtype=torch.uint8).set_(shared))
    return own.untyped_storage()


def _only_reference(storage: torch.UntypedStorage) -> bool:
    """Whether ``storage`` is referenced by this handle alone (no tensor
    of the batch still views it); False where torch cannot say."""
    use_count = getattr(torch._C, '_storage_Use_Count', None)
    return use_count is not None and use_count(storage._cdata) == 1
