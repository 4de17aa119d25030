"""Run a function on W fresh local processes that form a process group.

One launcher for everything that needs ranks without torchrun: the
benchmarks (each row in new processes, so each method's peak memory is its
own) and the tests (gloo ranks on the CPU). A rank that raises or dies
(e.g. killed for memory) makes the call fail with the reason and the rank,
instead of hanging.
"""
from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.multiprocessing as mp


class RanksFailed(RuntimeError):
    """A rank raised or died; the message says which and why."""


def free_port() -> int:
    """A TCP port of this machine that is free now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, device: str,
           threads: Optional[int], fn: Callable, args: tuple,
           results) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    try:
        if threads:
            torch.set_num_threads(threads)
        if device == 'cuda':
            torch.cuda.set_device(rank)
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo',
                                rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # bytes: shared-memory handles of tensors die with the rank
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # noqa: B902  report everything to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(fn: Callable, world_size: int, *args: Any,
                device: str = 'cpu', threads: Optional[int] = None,
                timeout: float = 1800,
                preload: Optional[Sequence[str]] = None) -> List[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` new processes with
    an initialized process group (gloo, or NCCL with rank r on ``cuda:r``
    for ``device='cuda'``); the return values in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). Raises
    :class:`RanksFailed` with the failing rank's traceback, the exit code of
    a rank that died, or after ``timeout`` seconds without all results.

    ``preload``: modules to import once in a fork server, from which every
    rank is then forked with them already imported (a rank starts in a
    fraction of a second instead of importing torch, MMEngine and mmpfc
    anew: what makes hundreds of small distributed tests affordable). The
    server only imports (no thread pool, no CUDA), so forking it is safe.
    None: every rank is a fresh interpreter (``spawn``), as the benchmarks
    want for their peak memory.
    """
    if preload is None:
        ctx = mp.get_context('spawn')
    else:
        ctx = mp.get_context('forkserver')
        ctx.set_forkserver_preload(list(preload))
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True, args=(
        r, world_size, port, device, threads, fn, args, results))
        for r in range(world_size)]
    for proc in procs:
        proc.start()
    collected, error = {}, None
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size and error is None:
            try:
                rank, ok, value = results.get(timeout=2.0)
            except queue_mod.Empty:
                error = _dead_or_late(procs, collected, deadline, timeout)
                continue
            if ok:
                collected[rank] = torch.load(io.BytesIO(value),
                                             weights_only=False)
            else:
                error = f'rank {rank} failed:\n{value}'
    finally:
        for proc in procs:
            proc.join(timeout=10 if error is None else 1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if error is not None:
        raise RanksFailed(error)
    return [collected[r] for r in range(world_size)]


def _dead_or_late(procs: list, collected: dict, deadline: float,
                  timeout: float) -> Optional[str]:
    """Why waiting longer is pointless, or None to keep waiting."""
    dead = [(r, p.exitcode) for r, p in enumerate(procs)
            if p.exitcode not in (None, 0) and r not in collected]
    if dead:
        return '; '.join(
            f'rank {r} exited with code {code}'
            + (' (killed: out of memory?)' if code == -9 else '')
            for r, code in dead)
    if time.monotonic() > deadline:
        return f'no result after {timeout:.0f} s'
    return None


def threads_per_rank(world_size: int, threads: Optional[int] = None) -> int:
    """Torch threads for each of ``world_size`` local ranks: ``threads``,
    else this process's cores shared out (at least 1)."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(
        os, 'sched_getaffinity') else os.cpu_count() or 1
    return max(1, cores // world_size)


def load_average() -> str:
    """The host's 1/5/15-minute load average (benchmarks record it)."""
    try:
        return ' '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        return 'n/a'
