"""Helpers shared by the test modules (import them from here, not from a
sibling test module)."""
from __future__ import annotations

import importlib.util
import logging
import os.path as osp
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmpfc.benchmark.speed.rows import BenchmarkRecord

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(*path: str) -> ModuleType:
    """A script under ``tools/`` (not a package) as a module, e.g.
    ``load_tool('deploy', 'export_onnx.py').main([...])``."""
    script = osp.join(ROOT, 'tools', *path)
    name = 'tool_' + '_'.join(path).replace('.py', '').replace('.', '_')
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LogRecords(logging.Handler):
    """The messages of MMEngine's current logger while in the ``with``
    block (its console handler holds the stream of its creation, which
    pytest's capture fixtures do not see)."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> list:
        from mmengine.logging import MMLogger
        MMLogger.get_current_instance().addHandler(self)
        return self.messages

    def __exit__(self, *exc) -> None:
        from mmengine.logging import MMLogger
        MMLogger.get_current_instance().removeHandler(self)


def benchmark_record(method: str, step: float, peak: float,
                     classes: int = 10**6, storage: str = 'fp32',
                     margin: str = 'arcface') -> BenchmarkRecord:
    """A head-only benchmark row of ``classes`` identities on 2 ranks as
    the report merges it: one run of ``step`` s and ``peak`` MB.
    ``method`` (``'mp'``, ``'pfc0.1'``), ``storage`` (``'bf16/int8'``) and
    ``margin`` (``'curricularface'``, ``'subcenter3'``) build the row as
    the benchmark does."""
    from mmpfc.benchmark.head_methods import parse_method
    from mmpfc.benchmark.margins import parse_margin
    from mmpfc.benchmark.speed.report import merge_runs
    from mmpfc.benchmark.speed.rows import (BenchmarkRow, LaunchSummary,
                                            parse_storage, row_label)
    from mmpfc.benchmark.speed.runner import margin_fields
    head, spec = parse_method(method), parse_margin(margin)
    center, state = parse_storage(storage)
    row = BenchmarkRow(
        label=row_label(head.label, center, state, spec.label),
        method=head.method, sample_rate=head.sample_rate,
        num_classes=classes, center_dtype=center, state_dtype=state,
        world_size=2, batch_size=128, embedding_size=512, backbone=None,
        predicted_mb=peak, **margin_fields(spec))
    run = LaunchSummary(step_s=step, phases_s=dict(head=step), peak_mb=peak,
                        steady_mb=peak, reserved_peak_mb=None,
                        phase_peak_mb={}, loss=1.0, device='cpu',
                        num_local=classes // 2, rows_per_step=1)
    return merge_runs(row, [run])


def drawn_rows(head) -> list:
    """The rows every step of ``head`` samples, as its center sampler
    returns them (its public ``sample``, seen on the way)."""
    drawn, sample = [], head.sampler.sample

    def seen_sample(local_labels):
        index, local = sample(local_labels)
        drawn.append(index.clone())
        return index, local

    head.sampler.sample = seen_sample
    return drawn
