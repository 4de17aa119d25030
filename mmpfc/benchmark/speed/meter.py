"""Peak memory and wall time of the phases of a step, on CPU or GPU.

On the GPU the figure is ``torch.cuda.max_memory_allocated`` (tensors
only). On the CPU it is the process's resident set: the high-water mark
``VmHWM`` of ``/proc/self/status``, which Linux resets when ``5`` is written
to ``/proc/self/clear_refs``. Both are taken relative to a baseline read
once the imports and the process group are done, so that a peak is what
the step itself adds. Where the high-water mark cannot be reset, phases get
no peak of their own and the overall peak is ``ru_maxrss`` (the whole life
of the process).
"""
from __future__ import annotations

import resource
import time
from typing import Dict, List, Optional

import torch

from mmpfc.utils.proc_memory import proc_kb

_MB = 2**20


def _status_kb(key: str) -> Optional[int]:
    return proc_kb('/proc/self/status', key)


class MemoryMeter:
    """Peak bytes above a baseline, per phase and overall."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == 'cuda'
        self.device = device
        self.baseline = 0
        self.overall = 0
        self.overall_reserved = 0  # CUDA: the caching allocator's pool
        self.can_reset = True
        self.phases: Dict[str, List[float]] = {}

    def _current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        kb = _status_kb('VmRSS')
        return 0 if kb is None else kb * 1024

    def _peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        kb = _status_kb('VmHWM') if self.can_reset else None
        if kb is None:  # ru_maxrss: kB on Linux
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb * 1024

    def _reset(self) -> None:
        if self.cuda:
            self.overall_reserved = max(
                self.overall_reserved,
                torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if self.can_reset:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
            except OSError:
                self.can_reset = False

    def start(self) -> None:
        """Take the baseline (call after imports and set-up)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.baseline = self._current()
        self._reset()

    def begin(self) -> None:
        """Start a phase: its peak is measured from here."""
        self.overall = max(self.overall, self._peak())
        self._reset()

    def end(self, phase: str) -> None:
        peak = self._peak()
        self.overall = max(self.overall, peak)
        if self.can_reset or self.cuda:
            self.phases.setdefault(phase, []).append(
                (peak - self.baseline) / _MB)

    def peak_mb(self) -> float:
        """Largest peak so far, MB above the baseline."""
        self.overall = max(self.overall, self._peak())
        return (self.overall - self.baseline) / _MB

    def reserved_peak_mb(self) -> Optional[float]:
        """CUDA only: the largest pool the allocator held (closer to what
        ``nvidia-smi`` shows, less the CUDA context)."""
        if not self.cuda:
            return None
        self._reset()
        return self.overall_reserved / _MB

    def current_mb(self) -> float:
        return (self._current() - self.baseline) / _MB


class PhaseTimer:
    """Wall time of consecutive phases, synchronizing the GPU at each."""

    def __init__(self, device: torch.device,
                 meter: Optional[MemoryMeter] = None) -> None:
        self.cuda = torch.device(device).type == 'cuda'
        self.device = device
        self.meter = meter
        self.times: Dict[str, List[float]] = {}
        self._phase: Optional[str] = None
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def phase(self, name: Optional[str]) -> None:
        """End the current phase (if any) and start ``name`` (if given)."""
        self._sync()
        now = time.perf_counter()
        if self._phase is not None:
            self.times.setdefault(self._phase, []).append(now - self._start)
            if self.meter is not None:
                self.meter.end(self._phase)
        self._phase = name
        if name is not None and self.meter is not None:
            self.meter.begin()
        self._start = time.perf_counter()
