"""A training run's measured speed and memory, read back from its log.

The fit check predicts a peak and a speed; a run on the GPU prints the
reference's speed line (:class:`mmpfc.engine.SpeedLogHook`) and the memory
table (:class:`mmpfc.engine.MemoryTableHook`). Reading those two back puts
the prediction beside the measurement (``tools/fit_check.py --run-log``,
``tools/check_gpu.sh``).
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import List, Optional

from .gpu_memory import ALLOCATOR_OVERHEAD, GPU_ALLOWANCES

_SPEED = re.compile(r'Training: Speed ([0-9.]+|inf) samples/sec')
_MEMORY_ROW = re.compile(
    r'\[(\d+)\] .*\|\s*([0-9.]+) /\s*([0-9.]+) MB \| peak\s+([0-9.]+) MB'
    r'(?: \| reserved\s+([0-9.]+) MB)?')
MB = 2**20


@dataclass(frozen=True)
class RunFigures:
    """Speeds (samples/s, one per speed line) and the largest memory any
    rank showed in any table, in MB: ``used`` of the device (what
    ``nvidia-smi`` shows), ``peak`` allocated by tensors, ``reserved`` by
    the caching allocator (None on the CPU)."""
    speeds: List[float]
    used_mb: float
    peak_mb: float
    reserved_mb: Optional[float]

    @property
    def steady_speed(self) -> float:
        """The median speed past the first interval, which pays for the
        warm-up (cuDNN's benchmark, the allocator, the loader starting)."""
        speeds = self.speeds[1:] or self.speeds
        return statistics.median(speeds)


def read_run_log(path: str) -> RunFigures:
    """The speed lines and memory tables of a training log (its text log
    file or the console output saved)."""
    with open(path, errors='replace') as f:
        text = f.read()
    speeds = [float(m.group(1)) for m in _SPEED.finditer(text)]
    rows = [m.groups() for m in _MEMORY_ROW.finditer(text)]
    if not speeds or not rows:
        raise ValueError(
            f'{path}: no speed line ("Training: Speed ... samples/sec") or '
            'no memory table ("[rank] ... | used / total MB | peak ... MB") '
            'in it; was it written by tools/train.py with the logger and '
            'memory hooks of configs/_base_/default_runtime.py?')
    reserved = [float(r[4]) for r in rows if r[4] is not None]
    return RunFigures(speeds=speeds,
                      used_mb=max(float(r[1]) for r in rows),
                      peak_mb=max(float(r[3]) for r in rows),
                      reserved_mb=max(reserved) if reserved else None)


def predicted_tensor_bytes(parts: dict) -> int:
    """The tensors of a fit check's parts: its peak less the GPU's
    allowances and the allocator's share (what ``max_memory_allocated``
    counts)."""
    return sum(nbytes for name, nbytes in parts.items()
               if name not in GPU_ALLOWANCES and name != 'allocator')


def compare_with_run(report: dict, run: RunFigures, label: str) -> str:
    """A markdown table: a fit check's prediction beside a run's figures
    (``report`` is :meth:`FitReport.to_dict`)."""
    tensors = predicted_tensor_bytes(report['parts']) / MB
    whole = report['peak_bytes'] / MB
    predicted_speed = report.get('samples_per_second') or 0.0

    def ratio(measured: float, predicted: float) -> str:
        return f'{measured / predicted:.2f}' if predicted > 0 else '-'

    speed = (f"{predicted_speed:.0f}" if predicted_speed > 0 else '-')
    lines = [
        f'{label}: measured / predicted (measured over predicted)',
        '| what | measured | predicted | ratio |',
        '|---|---:|---:|---:|',
        f'| samples/s (median past the first interval) | '
        f'{run.steady_speed:.0f} | {speed} | '
        f'{ratio(run.steady_speed, predicted_speed)} |',
        f'| device used, MB (nvidia-smi; predicted: the peak with the '
        f"GPU's allowances) | {run.used_mb:.0f} | {whole:.0f} | "
        f'{ratio(run.used_mb, whole)} |',
        f'| tensors at the peak, MB (max allocated; predicted: the peak '
        f'less allowances and allocator) | {run.peak_mb:.0f} | '
        f'{tensors:.0f} | {ratio(run.peak_mb, tensors)} |',
    ]
    if run.reserved_mb is not None:
        reserved = tensors * (1 + ALLOCATOR_OVERHEAD)
        lines.append(f'| reserved by the allocator, MB | '
                     f'{run.reserved_mb:.0f} | {reserved:.0f} | '
                     f'{ratio(run.reserved_mb, reserved)} |')
    return '\n'.join(lines)
