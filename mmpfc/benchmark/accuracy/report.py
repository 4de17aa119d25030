"""Tables, the PFC-vs-MP check and the JSON of the accuracy benchmark."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .rows import AccuracyRecord, AccuracySummary, PairedDifference


def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample std (0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def summarize(records: Sequence[AccuracyRecord]) -> List[AccuracySummary]:
    """One row per method label (first-seen order): mean and std over
    seeds of accuracy (fraction), training loss, loss over all centers,
    and seconds per run."""
    rows = []
    for label in dict.fromkeys(r.label for r in records):
        mine = [r for r in records if r.label == label]
        figures = {}
        for key in ('accuracy', 'train_loss', 'full_loss', 'run_s'):
            figures[key], figures[f'{key}_std'] = _mean_std(
                [getattr(r, key) for r in mine])
        rows.append(AccuracySummary(label=label, seeds=[r.seed for r in mine],
                                    **figures))
    return rows


def markdown(rows: Sequence[AccuracySummary]) -> str:
    """The Markdown table of :func:`summarize`'s rows."""
    lines = ['| method | verification accuracy % | final training loss | '
             'loss over all centers | s/run |',
             '|---|---|---|---|---|']
    for row in rows:
        lines.append(
            f'| {row.label} | {100 * row.accuracy:.2f} +- '
            f'{100 * row.accuracy_std:.2f} | {row.train_loss:.3f} +- '
            f'{row.train_loss_std:.3f} | {row.full_loss:.3f} +- '
            f'{row.full_loss_std:.3f} | {row.run_s:.0f} |')
    return '\n'.join(lines)


def paired_difference(records: Sequence[AccuracyRecord], label: str,
                      reference: str,
                      tolerance: float) -> Optional[PairedDifference]:
    """Mean over seeds of ``accuracy(label) - accuracy(reference)`` in
    points, on the seeds both ran (None if there is none); passed when its
    size is at most ``tolerance``."""
    acc: Dict[str, Dict[int, float]] = {}
    for r in records:
        acc.setdefault(r.label, {})[r.seed] = r.accuracy
    seeds = sorted(set(acc.get(label, {})) & set(acc.get(reference, {})))
    if not seeds:
        return None
    diffs = [100 * (acc[label][s] - acc[reference][s]) for s in seeds]
    mean, std = _mean_std(diffs)
    return PairedDifference(label=label, reference=reference, seeds=seeds,
                            difference_points=mean, difference_std=std,
                            per_seed=diffs, tolerance=tolerance,
                            passed=abs(mean) <= tolerance)


def check_line(check: Optional[PairedDifference],
               reference_name: str = 'model parallel') -> str:
    """``PFC0.1 within 0.5 points of model parallel: PASS (difference
    -0.12)``, or why there is no check."""
    if check is None:
        return (f'PFC0.1 against {reference_name}: not checked (needs both '
                'rows in --methods)')
    return (f'{check.label} within {check.tolerance} points of '
            f"{reference_name}: {'PASS' if check.passed else 'FAIL'} "
            f'(difference {check.difference_points:+.2f})')


def compact_storage_labels(records: Sequence[AccuracyRecord]) -> List[str]:
    """Labels of the PFC0.1 rows that store centers or their state in a
    compact form with the recommended (stochastic) rounding: the rows
    compared with fp32 PFC0.1."""
    labels = []
    for r in records:
        head, optim = r.head or {}, r.optim_wrapper or {}
        compact = (head.get('center_dtype', 'float32') != 'float32'
                   or optim.get('center_state_dtype', 'float32')
                   != 'float32')
        if (r.name == 'pfc0.1' and compact
                and head.get('center_rounding', 'stochastic')
                == 'stochastic' and r.label not in labels):
            labels.append(r.label)
    return labels


def write_json(path: str, config: Dict[str, Any],
               records: Sequence[AccuracyRecord],
               rows: Sequence[AccuracySummary],
               check: Optional[PairedDifference], wall_s: float,
               storage_checks: Sequence[PairedDifference] = ()) -> None:
    """Every figure: the config, per-seed records, summary rows, checks."""
    with open(path, 'w') as f:
        json.dump(dict(config=config, wall_s=wall_s,
                       runs=[asdict(r) for r in records],
                       summary=[asdict(r) for r in rows],
                       check=None if check is None else asdict(check),
                       storage_checks=[asdict(c) for c in storage_checks]),
                  f, indent=1)
