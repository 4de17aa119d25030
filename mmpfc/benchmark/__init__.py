"""Benchmarks of DP / MP / Partial FC and the models behind them.

:mod:`.speed` measures speed and memory (``tools/benchmark.py``),
:mod:`.accuracy` the verification accuracy (``tools/benchmark_accuracy.py``);
beside them, the memory model (:mod:`.memory_model`, :mod:`.gpu_memory`)
and what it answers (:mod:`.fit_check`, :mod:`.capacity`).
``docs/benchmark.md`` shows the results and how they were made.
"""
from .memory_model import (MemoryEstimate, activation_bytes_per_sample,
                           head_memory, max_num_classes, predict_memory)

__all__ = [
    'MemoryEstimate', 'activation_bytes_per_sample', 'head_memory',
    'max_num_classes', 'predict_memory'
]
