"""Spawn gloo ranks from a test: ``run_distributed(fn, world_size, *args)``.

``fn(rank, world_size, *args)`` runs in every rank with a gloo process group
initialized and one thread per rank (world_size 1 runs in-process without a
group). Each rank's return value is collected and returned in rank order; an
exception in any rank is re-raised in the test with its traceback. The
launcher is the package's own (:func:`mmpfc.utils.spawn.spawn_ranks`); its
ranks are forked from a server that has imported :data:`PRELOAD` once.
"""
from __future__ import annotations

from typing import Any, Callable

from mmpfc.utils.spawn import free_port, spawn_ranks

__all__ = ['free_port', 'run_distributed', 'run_in_fresh_process']

#: Imported once by the fork server the ranks start from.
PRELOAD = ('torch', 'mmengine.runner', 'mmpretrain.models', 'mmpfc')


def run_distributed(fn: Callable, world_size: int, *args: Any,
                    timeout: float = 300) -> list:
    """Run ``fn`` on ``world_size`` gloo ranks and return their results."""
    if world_size == 1:
        return [fn(0, 1, *args)]
    return spawn_ranks(fn, world_size, *args, device='cpu', threads=1,
                       timeout=timeout, preload=PRELOAD)


def run_in_fresh_process(fn: Callable, *args: Any,
                         timeout: float = 300) -> Any:
    """``fn(0, 1, *args)`` in a process forked from the preloaded server
    (a one-rank gloo group): its heap holds nothing the tests before it
    left, so a memory peak measured there is the function's own."""
    return spawn_ranks(fn, 1, *args, device='cpu', threads=1,
                       timeout=timeout, preload=PRELOAD)[0]
