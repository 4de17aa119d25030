"""Start-up of the process group outside torchrun: a missing rank fails
within ``start_timeout`` with a message, instead of hanging 30 minutes.

Each rank is a process of its own (forked from the tests' preloaded server,
so it starts in a fraction of a second) that sets the env:// variables by
hand, as a scheduler that starts ranks without torchrun would.
"""
import os
import time
import traceback

import torch.multiprocessing as mp
from dist_utils import PRELOAD, free_port


def start_rank(rank: int, port: int, results) -> None:
    """Join a 2-rank group at ``port`` with start_timeout=2 s; report
    ``(rank, ok, text)``: the ranks seen, or the error's traceback."""
    os.environ.update(RANK=str(rank), WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    import torch.distributed as dist

    from mmpfc.utils.process_group import init_process_group_for_device
    try:
        init_process_group_for_device('pytorch', backend='gloo',
                                      start_timeout=2)
        dist.barrier()
        results.put((rank, True, f'{dist.get_rank()} {dist.get_world_size()}'))
        dist.destroy_process_group()
    except Exception:  # noqa: B902  the message is what is tested
        results.put((rank, False, traceback.format_exc()))


def run_ranks(ports):
    """One process per entry of ``ports`` (rank = position); the results
    by rank."""
    ctx = mp.get_context('forkserver')
    ctx.set_forkserver_preload(list(PRELOAD))
    results = ctx.Queue()
    procs = [ctx.Process(target=start_rank, args=(rank, port, results))
             for rank, port in enumerate(ports)]
    for proc in procs:
        proc.start()
    found = {}
    for _ in procs:
        rank, ok, text = results.get(timeout=120)
        found[rank] = (ok, text)
    for proc in procs:
        proc.join(timeout=30)
    return found


def test_a_rank_alone_gives_up_with_a_message():
    """Rank 0 alone and rank 1 alone (each on its own port), side by side."""
    start = time.perf_counter()
    found = run_ranks([free_port(), free_port()])
    assert time.perf_counter() - start < 60
    for rank in (0, 1):
        ok, text = found[rank]
        assert not ok
        assert (f'rank {rank} of WORLD_SIZE=2: not every rank joined at '
                'MASTER_ADDR=127.0.0.1') in text
        assert 'start_timeout=2 s' in text
        assert 'tools/dist_train.sh' in text


def test_two_ranks_meet():
    port = free_port()
    found = run_ranks([port, port])
    assert found == {0: (True, '0 2'), 1: (True, '1 2')}
