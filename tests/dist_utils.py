"""Spawn gloo ranks from a test: ``run_distributed(fn, world_size, *args)``.

``fn(rank, world_size, *args)`` runs in every rank with a gloo process group
initialized (world_size 1 runs in-process without a group). Each rank's
return value is collected and returned in rank order; an exception in any rank
is re-raised in the test with its traceback.
"""
from __future__ import annotations

import io
import os
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
            queue) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group('gloo', rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialize tensors to bytes: shared-memory handles die with the rank.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: B902  report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any,
                    timeout: float = 300) -> list:
    """Run ``fn`` on ``world_size`` gloo ranks and return their results."""
    if world_size == 1:
        return [fn(0, 1, *args)]
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker,
                         args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = torch.load(io.BytesIO(value),
                                           weights_only=False)
            else:
                errors.append(f'rank {rank} failed:\n{value}')
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError('\n'.join(errors))
    return [results[r] for r in range(world_size)]
