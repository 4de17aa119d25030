"""Speed and memory benchmark of DP / MP / Partial FC, and the memory model.

``tools/benchmark.py`` is the command line; ``docs/benchmark.md`` shows the
results and how they were made.
"""
from .memory_model import (MemoryEstimate, activation_bytes_per_sample,
                           head_memory, max_num_classes, predict_memory)
from .runner import (BenchmarkConfig, make_rows, parse_count, parse_method,
                     run_benchmark)

__all__ = [
    'MemoryEstimate', 'activation_bytes_per_sample', 'head_memory',
    'max_num_classes', 'predict_memory', 'BenchmarkConfig', 'make_rows',
    'parse_count', 'parse_method', 'run_benchmark'
]
