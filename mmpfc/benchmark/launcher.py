"""Start W fresh processes for one benchmark row and collect their results.

Every row runs in new processes, so each method's peak memory is its own
(a process's resident set never shrinks back to what it was). The ranks use
gloo on the CPU and NCCL on GPUs (rank r on ``cuda:r``). A rank that dies
(e.g. killed for memory) or raises makes the row fail with the reason,
instead of hanging the benchmark.
"""
from __future__ import annotations

import os
import queue as queue_mod
import socket
import time
import traceback
from typing import List

import torch.multiprocessing as mp


class RowFailed(RuntimeError):
    """A rank of the row raised or died; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, row: dict, results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist
    try:
        if row['device'] == 'cuda':
            torch.cuda.set_device(rank)
        dist.init_process_group(
            'nccl' if row['device'] == 'cuda' else 'gloo', rank=rank,
            world_size=world_size)
        from .worker import run_rank
        results.put((rank, True, run_rank(rank, world_size, row)))
    except BaseException:  # noqa: B902  report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(row: dict, world_size: int, timeout: float = 1800) -> List[dict]:
    """Run ``row`` on ``world_size`` new processes; results in rank order."""
    ctx = mp.get_context('spawn')
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child,
                         args=(r, world_size, port, row, results),
                         daemon=True) for r in range(world_size)]
    for proc in procs:
        proc.start()
    collected, error = {}, None
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and error is None:
            try:
                rank, ok, value = results.get(timeout=2.0)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in collected]
                if dead:
                    error = '; '.join(
                        f'rank {r} exited with code {code}'
                        + (' (killed: out of memory?)' if code == -9 else '')
                        for r, code in dead)
                elif time.monotonic() > deadline:
                    error = f'no result after {timeout:.0f} s'
                continue
            if ok:
                collected[rank] = value
            else:
                error = f'rank {rank} failed:\n{value}'
    finally:
        for proc in procs:
            proc.join(timeout=10 if error is None else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if error is not None:
        raise RowFailed(error)
    return [collected[r] for r in range(world_size)]
