"""A per-rank memory table gathered to rank 0, in the spirit of gpustat -i."""
from __future__ import annotations

import resource
import socket
from typing import List, Optional, Sequence

import torch
from mmengine.dist import all_gather_object
from mmengine.hooks import Hook

from mmpfc.registry import HOOKS
from mmpfc.utils.arg_checks import Int, Opt, arg_specs
from mmpfc.utils.proc_memory import proc_kb

from .speed_log_hook import logger_interval

_MB = 2**20


def rank_memory(rank: int) -> dict:
    """What this rank uses, in MB.

    On CUDA: ``used`` / ``total`` of the whole device (what ``gpustat``
    shows: every process and the CUDA context), ``peak`` the most memory
    this process's tensors held since the peak statistics were last reset
    (:func:`reset_peak_memory`; ``MemoryTableHook`` resets them after every
    table, so it is the peak of the interval), ``reserved`` its caching
    allocator's pool. On the CPU: the process RSS (``used``), its
    high-water mark since the process started (``peak``) and the machine's
    memory (``total``).
    """
    host = socket.gethostname()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(device)
        return dict(rank=rank, host=host, kind='cuda',
                    device=f'cuda:{device} {torch.cuda.get_device_name()}',
                    used=(total - free) / _MB, total=total / _MB,
                    peak=torch.cuda.max_memory_allocated(device) / _MB,
                    reserved=torch.cuda.memory_reserved(device) / _MB)
    rss_kb = proc_kb('/proc/self/status', 'VmRSS')
    peak_kb = proc_kb('/proc/self/status', 'VmHWM')
    if peak_kb is None:  # ru_maxrss is kB on Linux, bytes on macOS
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total_kb = proc_kb('/proc/meminfo', 'MemTotal') or 0
    return dict(rank=rank, host=host, kind='cpu', device='cpu (RSS)',
                used=(rss_kb if rss_kb is not None else peak_kb) / 1024,
                total=total_kb / 1024, peak=peak_kb / 1024, reserved=None)


def reset_peak_memory() -> None:
    """Start a new interval for the CUDA ``peak`` of :func:`rank_memory`.

    A no-op without an initialized CUDA context. The CPU high-water mark
    (``VmHWM``) is the process's and is not reset.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats(torch.cuda.current_device())


def format_memory_table(rows: Sequence[dict], step: int) -> str:
    """One line per rank: ``[r] host device | used / total MB | peak MB``."""
    kinds = {row['kind'] for row in rows}
    what = ('device memory (used/total of the GPU; peak = max allocated '
            'by the process since the previous table)'
            if kinds == {'cuda'} else
            'process RSS (used/total of the host; peak = high-water mark)')
    width = max(len(f"{row['host']} {row['device']}") for row in rows)
    lines = [f'Memory per rank after step {step}, {what}:']
    for row in rows:
        name = f"{row['host']} {row['device']}".ljust(width)
        line = (f"[{row['rank']}] {name} | {row['used']:6.0f} / "
                f"{row['total']:6.0f} MB | peak {row['peak']:6.0f} MB")
        if row.get('reserved') is not None:
            line += f" | reserved {row['reserved']:6.0f} MB"
        lines.append(line)
    return '\n'.join(lines)


@HOOKS.register_module()
@arg_specs(interval=Int(low=1), first=Opt(Int(low=1)))
class MemoryTableHook(Hook):
    """Logs every rank's memory as a table on rank 0, like ``gpustat -i``.

    Every rank measures itself (:func:`rank_memory`: device memory on GPU,
    process RSS on the CPU); the rows are all-gathered and rank 0 logs::

        Memory per rank after step 100, process RSS (...):
        [0] node1 cpu (RSS) |   7410 /  24003 MB | peak   7420 MB
        [1] node1 cpu (RSS) |   7398 /  24003 MB | peak   7411 MB

    On GPUs ``peak`` is the interval's: the CUDA peak statistics are reset
    when training starts and after every table, so a table shows the peak
    since the previous one (the first includes the start-up, e.g. the cuDNN
    benchmark search), not the peak since the process started. On the CPU
    it is the process's RSS high-water mark.

    The largest ``used`` over ranks goes to the message hub as
    ``train/mem_used_mb`` (JSON log, TensorBoard). The table is logged after
    iteration ``first`` (default: the ``LoggerHook`` interval), every
    ``interval`` iterations, and when training ends. Every rank must run the
    hook (it is collective).

    Example::

        custom_hooks = [dict(type='MemoryTableHook', interval=1000)]

    Args:
        interval: Iterations between tables.
        first: Iteration of the first table; ``None``: the logger interval.
    """

    priority = 'NORMAL'

    def __init__(self, interval: int = 1000,
                 first: Optional[int] = None) -> None:
        self.interval = interval
        self.first = first

    def before_train(self, runner) -> None:
        if self.first is None:
            self.first = logger_interval(runner)
        reset_peak_memory()  # the first interval starts with training

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Sequence] = None,
                         outputs: Optional[dict] = None) -> None:
        step = runner.iter + 1
        if step == self.first or self.every_n_train_iters(
                runner, self.interval):
            self.log_table(runner, step)

    def after_train(self, runner) -> None:
        step = runner.iter
        if step != self.first and step % self.interval:
            self.log_table(runner, step)

    def log_table(self, runner, step: int) -> List[dict]:
        """Gather the rows (collective) and log them on rank 0."""
        rows = all_gather_object(rank_memory(runner.rank))
        runner.message_hub.update_scalar(
            'train/mem_used_mb', max(row['used'] for row in rows))
        if runner.rank == 0:
            runner.logger.info(format_memory_table(rows, step))
        reset_peak_memory()  # the next table shows the next interval's peak
        return rows
