"""The package's process launcher (tests and benchmarks share it): fresh
interpreters (``spawn``, the benchmarks) and ranks forked from a server
that preloaded the imports (the tests)."""
import os
import time

import pytest
import torch
import torch.distributed as dist
from dist_utils import PRELOAD

from mmpfc.utils.spawn import RanksFailed, spawn_ranks


def sum_of_ranks(rank, world_size, scale):
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return dict(rank=rank, total=value * scale,
                threads=torch.get_num_threads())


def fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError('bad value on rank one')
    return rank


def die_on_rank_one(rank, world_size):
    if rank == 1:
        os._exit(3)
    time.sleep(60)  # rank 0 is still busy when rank 1 dies


@pytest.mark.parametrize('preload', [None, PRELOAD])
def test_results_in_rank_order_with_tensors(preload):
    results = spawn_ranks(sum_of_ranks, 2, 10.0, threads=1, timeout=120,
                          preload=preload)
    assert [r['rank'] for r in results] == [0, 1]
    assert all(torch.equal(r['total'], torch.tensor([10.0]))
               for r in results)
    assert all(r['threads'] == 1 for r in results)


def test_a_raising_rank_is_named_with_its_traceback():
    with pytest.raises(RanksFailed, match=r'(?s)rank 1 failed:.*ValueError: '
                       'bad value on rank one'):
        spawn_ranks(fail_on_rank_one, 2, timeout=120, preload=PRELOAD)


def test_a_dying_rank_is_named_with_its_exit_code():
    with pytest.raises(RanksFailed, match='rank 1 exited with code 3'):
        spawn_ranks(die_on_rank_one, 2, timeout=120, preload=PRELOAD)
