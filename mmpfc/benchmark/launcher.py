"""Start W fresh processes for one benchmark row and collect their results.

Every row runs in new processes, so each method's peak memory is its own
(a process's resident set never shrinks back to what it was). The ranks use
gloo on the CPU and NCCL on GPUs (rank r on ``cuda:r``); the processes come
from the package's launcher, :func:`mmpfc.utils.spawn.spawn_ranks`. A rank
that dies (e.g. killed for memory) or raises makes the row fail with the
reason, instead of hanging the benchmark.
"""
from __future__ import annotations

from typing import Callable, List, Optional

from mmpfc.utils.spawn import RanksFailed, spawn_ranks


class RowFailed(RuntimeError):
    """A rank of the row raised or died; the message says which and why."""


def launch(row: dict, world_size: int, timeout: float = 1800,
           target: Optional[Callable] = None) -> List[dict]:
    """``target(rank, world_size, row)`` (default: the speed benchmark's
    :func:`.worker.run_rank`) on ``world_size`` new processes; results in
    rank order."""
    if target is None:
        from .worker import run_rank as target
    try:
        return spawn_ranks(target, world_size, row,
                           device=row.get('device', 'cpu'), timeout=timeout)
    except RanksFailed as err:
        raise RowFailed(str(err)) from err
