"""Stopping a run's DataLoader workers when the run ends.

Persistent workers (the dataset configs' ``persistent_workers=True``), and
the workers of the iterator an iteration-based loop keeps, otherwise live
until the interpreter exits. There, ``multiprocessing`` terminates them and
torch's ``SIGCHLD`` handler reports each as "killed by signal: Terminated"
in a traceback after a run that went well (torch 2.14 with MMEngine
0.10.7's ``IterBasedTrainLoop``). Stopping them as the run ends
(``_shutdown_workers``, what torch itself calls when an iterator is
deleted) joins them cleanly.
"""
from __future__ import annotations

from mmengine.runner.base_loop import BaseLoop


def stop_loop_workers(loop: object) -> None:
    """Stop the workers of a built loop's loader and of the iterator the
    loop keeps over it; anything else (a loop still a config dict, a
    loader without workers) is left as it is. A later ``iter(loader)``
    starts new workers."""
    if not isinstance(loop, BaseLoop):
        return
    loader = loop.dataloader
    kept = getattr(loop, 'dataloader_iterator', None)  # IterBasedTrainLoop
    for iterator in (getattr(kept, '_iterator', None),
                     getattr(loader, '_iterator', None)):
        shutdown = getattr(iterator, '_shutdown_workers', None)
        if shutdown is not None:
            shutdown()
    if getattr(loader, '_iterator', None) is not None:
        loader._iterator = None
