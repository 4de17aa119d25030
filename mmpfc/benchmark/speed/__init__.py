"""Speed and memory benchmark of DP / MP / Partial FC.

``tools/benchmark.py`` is the command line; ``docs/benchmark.md`` shows the
results and how they were made. The accuracy benchmark lives beside it, in
:mod:`mmpfc.benchmark.accuracy`.
"""
from .ratios import RATIOS, Ratio, RatioCheck, ratio_checks
from .report import markdown, merge_runs, summarize_launch
from .rows import (BenchmarkRecord, BenchmarkRow, LaunchSummary, RankResult,
                   RowMeasurement, parse_storage, row_label)
from .runner import BenchmarkConfig, make_rows, parse_count, run_benchmark

__all__ = [
    'RATIOS', 'Ratio', 'RatioCheck', 'ratio_checks', 'markdown',
    'merge_runs', 'summarize_launch', 'BenchmarkRecord', 'BenchmarkRow',
    'LaunchSummary', 'RankResult', 'RowMeasurement', 'parse_storage',
    'row_label', 'BenchmarkConfig', 'make_rows', 'parse_count',
    'run_benchmark'
]
