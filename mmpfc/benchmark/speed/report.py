"""Summaries of benchmark rows: medians, Markdown, JSON and plots."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .ratios import RatioCheck, verdict
from .rows import (BenchmarkRecord, BenchmarkRow, LaunchSummary, RankResult,
                   RowMeasurement)
from .worker import PHASES


def summarize_launch(ranks: Sequence[RankResult]) -> LaunchSummary:
    """One launch: per-step maxima over ranks, medians over steps."""
    first = ranks[0]
    steps = len(first.times.get('head', []))
    phase = {
        name: statistics.median(
            max(r.times[name][i] for r in ranks) for i in range(steps))
        for name in PHASES if name in first.times and steps}
    step = statistics.median(
        max(sum(r.times[name][i] for name in PHASES if name in r.times)
            for r in ranks)
        for i in range(steps)) if steps else float('nan')
    gemm_parts = gemm = None
    if first.gemm is not None:
        gemm_parts = {k: max(r.gemm[k] for r in ranks) for k in first.gemm}
        gemm = max(sum(r.gemm.values()) for r in ranks)
    return LaunchSummary(
        step_s=step, phases_s=phase,
        peak_mb=max(r.peak_mb for r in ranks),
        steady_mb=max(r.steady_mb for r in ranks),
        reserved_peak_mb=max((r.reserved_peak_mb or 0.0 for r in ranks),
                             default=0.0) or None,
        phase_peak_mb={k: max(r.phase_peak_mb.get(k, 0.0) for r in ranks)
                       for k in first.phase_peak_mb},
        loss=first.loss, device=first.device, num_local=first.num_local,
        rows_per_step=first.rows_per_step, gemm_parts_s=gemm_parts,
        gemm_s=gemm)


def merge_runs(row: BenchmarkRow,
               runs: Sequence[LaunchSummary]) -> BenchmarkRecord:
    """Median over repeated launches of one row, plus the per-run values
    (no launch: the row, not run)."""
    if not runs:
        return BenchmarkRecord(row)
    med = statistics.median
    step = med(r.step_s for r in runs)
    gemm = gemm_parts = None
    if runs[0].gemm_s is not None:
        gemm = med(r.gemm_s for r in runs)
        gemm_parts = {k: med(r.gemm_parts_s[k] for r in runs)
                      for k in runs[0].gemm_parts_s}
    measured = RowMeasurement(
        runs=len(runs), step_s=step, step_runs_s=[r.step_s for r in runs],
        phases_s={k: med(r.phases_s[k] for r in runs)
                  for k in runs[0].phases_s},
        peak_mb=med(r.peak_mb for r in runs),
        peak_runs_mb=[r.peak_mb for r in runs],
        steady_mb=med(r.steady_mb for r in runs),
        reserved_peak_mb=None if runs[0].reserved_peak_mb is None else
        med(r.reserved_peak_mb for r in runs),
        phase_peak_mb={k: med(r.phase_peak_mb[k] for r in runs)
                       for k in runs[0].phase_peak_mb},
        loss=runs[-1].loss, device=runs[-1].device,
        num_local=runs[0].num_local, rows_per_step=runs[0].rows_per_step,
        samples_per_s=row.world_size * row.batch_size / step,
        gemm_s=gemm, gemm_parts_s=gemm_parts)
    return BenchmarkRecord(row, status='ok', measured=measured)


def _not_ok(rec: Optional[BenchmarkRecord]) -> str:
    """The cell of a row that has no figure: ``-`` (absent or does not
    fit), ``n/a`` (not available in this version) or ``failed``."""
    if rec is None or rec.status == 'does not fit':
        return '-'
    return 'n/a' if rec.status == 'not available' else 'failed'


def _fmt_speed(rec: Optional[BenchmarkRecord]) -> str:
    if rec is None or not rec.ok:
        return _not_ok(rec)
    value = rec.measured.samples_per_s
    return f'{value:.0f}' if value >= 100 else f'{value:.3g}'


def _fmt_mem(rec: Optional[BenchmarkRecord]) -> str:
    if rec is None or not rec.ok:
        return _not_ok(rec)
    return f'{rec.measured.peak_mb:.0f}'


def _backbone(phases: Dict[str, float]) -> float:
    """The backbone's forward and backward of a step's phases."""
    return phases.get('backbone_forward', 0) + phases.get(
        'backbone_backward', 0)


def _overview_lines(records: Sequence[BenchmarkRecord],
                    by_key: Dict[Tuple[int, str], BenchmarkRecord],
                    labels: List[str], classes: List[int]) -> List[str]:
    """The reference's layout: speed and memory per method and C
    (``by_key``: the records by (C, label))."""
    head = ['identities', *[f'{m} speed' for m in labels],
            *[f'{m} mem' for m in labels]]
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '---|' * len(head)]
    for c in classes:
        cells = [f'{c:,}'] + [_fmt_speed(by_key.get((c, m))) for m in labels]
        cells += [_fmt_mem(by_key.get((c, m))) for m in labels]
        lines.append('| ' + ' | '.join(cells) + ' |')
    unavailable = any(r.status == 'not available' for r in records)
    return lines + [
        '', 'Speed: samples/s of the global batch (larger is better). '
        'Memory: peak MB per rank above the process baseline '
        '(smaller is better); `-`: does not fit the memory budget.'
        + (' `n/a`: not available in this version.' if unavailable
           else '')]


def _detail_line(rec: BenchmarkRecord) -> str:
    """One row of the detailed table: the step's split and the memory
    measured beside the prediction."""
    c, m, pred = rec.row.num_classes, rec.row.label, rec.row.predicted_mb
    if not rec.ok:
        return (f'| {c:,} | {m} | {status_text(rec)} | | | | | '
                f'| {pred:.0f} | | |')
    measured = rec.measured
    phases = {k: 1e3 * v for k, v in measured.phases_s.items()}
    gemm = measured.gemm_s
    return (f'| {c:,} | {m} | {_fmt_speed(rec)} | '
            f'{1e3 * measured.step_s:.0f} | {_backbone(phases):.0f} | '
            f"{phases.get('head', 0):.0f} | "
            f"{phases.get('optimizer', 0):.0f} | "
            f'{measured.peak_mb:.0f} | {pred:.0f} | '
            f'{measured.peak_mb / pred:.2f} | '
            + (f'{1e3 * gemm:.0f} |' if gemm else '- |'))


def markdown(records: Sequence[BenchmarkRecord],
             checks: Sequence[RatioCheck]) -> str:
    """The reference's table layout (speed and memory per method and C), a
    detailed table and the ratio checks."""
    labels = list(dict.fromkeys(r.row.label for r in records))
    by_key = {(r.row.num_classes, r.row.label): r for r in records}
    classes = sorted({r.row.num_classes for r in records})
    lines = _overview_lines(records, by_key, labels, classes)
    lines += ['', '| identities | method | samples/s | step ms | backbone ms '
              '| head ms | optimizer ms | peak MB | predicted MB | '
              'measured / predicted | 3 GEMMs ms |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    lines += [_detail_line(by_key[(c, m)]) for c in classes for m in labels
              if (c, m) in by_key]
    if checks:
        lines += ['', '| identities | target | value | limit | result |',
                  '|---|---|---|---|---|']
        lines += [f'| {chk.num_classes:,} | {chk.target} | '
                  f'{chk.value:.3f} | {chk.limit:.3f} | {verdict(chk)} |'
                  for chk in checks]
    return '\n'.join(lines)


def plot(records: Sequence[BenchmarkRecord], path_prefix: str) -> List[str]:
    """``<prefix>speed.png`` (log-log) and ``<prefix>memory.png`` (log x)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r.row.label for r in records))
    paths = []
    for key, ylabel, name in (('samples_per_s', 'samples / s', 'speed'),
                              ('peak_mb', 'peak MB per rank', 'memory')):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, label in enumerate(labels):
            rows = sorted((r for r in records if r.row.label == label),
                          key=lambda r: r.row.num_classes)
            ok = [r for r in rows if r.ok]
            color = f'C{i}'
            ax.plot([r.row.num_classes for r in ok],
                    [getattr(r.measured, key) for r in ok],
                    'o-', color=color, label=label)
            if key == 'peak_mb':
                ax.plot([r.row.num_classes for r in rows],
                        [r.row.predicted_mb for r in rows], 'x--',
                        color=color, alpha=0.6, label=f'{label} predicted')
        budgets = {r.row.budget_mb for r in records if r.row.budget_mb}
        if key == 'peak_mb' and budgets:
            ax.axhline(min(budgets), color='gray', linestyle=':',
                       label='memory budget')
        ax.set_xscale('log')
        if key == 'samples_per_s':  # methods differ by orders of magnitude
            ax.set_yscale('log')
        ax.set_xlabel('identities')
        ax.set_ylabel(ylabel)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize='small')
        fig.tight_layout()
        path = f'{path_prefix}{name}.png'
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_json(path: str, config: Dict[str, Any],
               records: Sequence[BenchmarkRecord],
               checks: Sequence[RatioCheck]) -> None:
    """``benchmark.json``: the run's config, every row as one flat object
    (:meth:`BenchmarkRecord.to_json`) and the ratio checks."""
    with open(path, 'w') as f:
        json.dump(dict(config=config, rows=[r.to_json() for r in records],
                       targets=[asdict(c) for c in checks]), f, indent=1)


def status_text(rec: BenchmarkRecord) -> str:
    """A row that did not run: its status and, when it does not fit, the
    most identities the model says would."""
    if rec.status == 'does not fit' and rec.max_classes is not None:
        return f'does not fit (fits <= {rec.max_classes:,})'
    if rec.status == 'not available' and rec.error:
        return rec.error
    return rec.status


def progress_line(rec: BenchmarkRecord) -> str:
    """One line per launch, printed as the benchmark goes."""
    head = f'{rec.row.label:>8s} C={rec.row.num_classes:>11,}'
    pred = f'predicted {rec.row.predicted_mb:.0f} MB'
    if not rec.ok:
        return f'{head}: {status_text(rec)} ({pred})'
    measured = rec.measured
    phases = measured.phases_s
    split = (f'backbone {1e3 * _backbone(phases):.0f} + head '
             f"{1e3 * phases.get('head', 0):.0f} + optimizer "
             f"{1e3 * phases.get('optimizer', 0):.0f} ms")
    gemm = (f', 3 GEMMs {1e3 * measured.gemm_s:.0f} ms'
            if measured.gemm_s else '')
    return (f'{head}: {measured.samples_per_s:.1f} samples/s, step '
            f'{1e3 * measured.step_s:.0f} ms ({split}){gemm}, peak '
            f'{measured.peak_mb:.0f} MB/rank, {pred}')
