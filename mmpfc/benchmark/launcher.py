"""Start W fresh processes for one benchmark row and collect their results.

Every row runs in new processes, so each method's peak memory is its own
(a process's resident set never shrinks back to what it was). The ranks use
gloo on the CPU and NCCL on GPUs (rank r on ``cuda:r``); the processes come
from the package's launcher, :func:`mmpfc.utils.spawn.spawn_ranks`. A rank
that dies (e.g. killed for memory) or raises makes the row fail with the
reason, instead of hanging the benchmark. Both benchmarks launch through
it, each with its own worker (``target``).
"""
from __future__ import annotations

from typing import Any, Callable, List

from mmpfc.utils.spawn import RanksFailed, spawn_ranks


class RowFailed(RuntimeError):
    """A rank of the row raised or died; the message says which and why."""


def launch(target: Callable[[int, int, Any], Any], row: Any,
           world_size: int, timeout: float = 1800,
           device: str = 'cpu') -> List[Any]:
    """``target(rank, world_size, row)`` on ``world_size`` new processes
    (on ``device``: ``'cpu'`` or ``'cuda'``); results in rank order."""
    try:
        return spawn_ranks(target, world_size, row, device=device,
                           timeout=timeout)
    except RanksFailed as err:
        raise RowFailed(str(err)) from err
