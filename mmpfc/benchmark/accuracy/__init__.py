"""Accuracy benchmark: does sampling the centers cost accuracy?

The same small model is trained on a learnable synthetic identity problem
with each head configuration (data parallel, model parallel, Partial FC)
and evaluated with the 10-fold verification protocol on pairs of held-out
identities. ``tools/benchmark_accuracy.py`` is the command line;
``docs/benchmark.md`` shows a run.
"""
from .data import (SyntheticIdentityDataset, VerificationPairs, build_pairs,
                   held_out)
from .methods import MethodSpec, parse_method_spec, parse_methods
from .report import (check_line, compact_storage_labels, markdown,
                     paired_difference, summarize, write_json)
from .rows import (AccuracyRecord, AccuracyRow, AccuracySummary, MethodResult,
                   PairedDifference, SeedResult, Verification)
from .runner import AccuracyConfig, check_methods, make_row, run_accuracy

__all__ = [
    'SyntheticIdentityDataset', 'VerificationPairs', 'build_pairs',
    'held_out', 'MethodSpec', 'parse_method_spec', 'parse_methods',
    'check_line', 'compact_storage_labels', 'markdown',
    'paired_difference',
    'summarize', 'write_json', 'AccuracyRecord', 'AccuracyRow',
    'AccuracySummary', 'MethodResult', 'PairedDifference', 'SeedResult',
    'Verification', 'AccuracyConfig', 'check_methods', 'make_row',
    'run_accuracy'
]
