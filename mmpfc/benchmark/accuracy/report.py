"""Tables, the PFC-vs-MP check and the JSON of the accuracy benchmark."""
from __future__ import annotations

import json
from typing import List, Optional, Sequence

import numpy as np


def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample std (0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def summarize(records: Sequence[dict]) -> List[dict]:
    """One row per method label (first-seen order): mean and std over
    seeds of accuracy (fraction), training loss, loss over all centers,
    and seconds per run."""
    rows = []
    for label in dict.fromkeys(r['label'] for r in records):
        mine = [r for r in records if r['label'] == label]
        row = dict(label=label, seeds=[r['seed'] for r in mine])
        for key in ('accuracy', 'train_loss', 'full_loss', 'run_s'):
            row[key], row[key + '_std'] = _mean_std([r[key] for r in mine])
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict]) -> str:
    """The Markdown table of :func:`summarize`'s rows."""
    lines = ['| method | verification accuracy % | final training loss | '
             'loss over all centers | s/run |',
             '|---|---|---|---|---|']
    for row in rows:
        lines.append(
            f"| {row['label']} | {100 * row['accuracy']:.2f} +- "
            f"{100 * row['accuracy_std']:.2f} | {row['train_loss']:.3f} +- "
            f"{row['train_loss_std']:.3f} | {row['full_loss']:.3f} +- "
            f"{row['full_loss_std']:.3f} | {row['run_s']:.0f} |")
    return '\n'.join(lines)


def paired_difference(records: Sequence[dict], label: str,
                      reference: str, tolerance: float) -> Optional[dict]:
    """Mean over seeds of ``accuracy(label) - accuracy(reference)`` in
    points, on the seeds both ran (None if there is none); passed when its
    size is at most ``tolerance``."""
    acc = {}
    for r in records:
        acc.setdefault(r['label'], {})[r['seed']] = r['accuracy']
    seeds = sorted(set(acc.get(label, {})) & set(acc.get(reference, {})))
    if not seeds:
        return None
    diffs = [100 * (acc[label][s] - acc[reference][s]) for s in seeds]
    mean, std = _mean_std(diffs)
    return dict(label=label, reference=reference, seeds=seeds,
                difference_points=mean, difference_std=std,
                per_seed=diffs, tolerance=tolerance,
                passed=abs(mean) <= tolerance)


def check_line(check: Optional[dict],
               reference_name: str = 'model parallel') -> str:
    """``PFC0.1 within 0.5 points of model parallel: PASS (difference
    -0.12)``, or why there is no check."""
    if check is None:
        return (f'PFC0.1 against {reference_name}: not checked (needs both '
                'rows in --methods)')
    tolerance = check['tolerance']
    return (f"{check['label']} within {tolerance} points of "
            f"{reference_name}: {'PASS' if check['passed'] else 'FAIL'} "
            f"(difference {check['difference_points']:+.2f})")


def compact_storage_labels(records: Sequence[dict]) -> List[str]:
    """Labels of the PFC0.1 rows that store centers or their state in a
    compact form with the recommended (stochastic) rounding: the rows
    compared with fp32 PFC0.1."""
    labels = []
    for r in records:
        head, optim = r.get('head') or {}, r.get('optim_wrapper') or {}
        compact = (head.get('center_dtype', 'float32') != 'float32'
                   or optim.get('center_state_dtype', 'float32')
                   != 'float32')
        if (r.get('name') == 'pfc0.1' and compact
                and head.get('center_rounding', 'stochastic')
                == 'stochastic' and r['label'] not in labels):
            labels.append(r['label'])
    return labels


def write_json(path: str, config: dict, records: Sequence[dict],
               rows: Sequence[dict], check: Optional[dict],
               wall_s: float,
               storage_checks: Sequence[dict] = ()) -> None:
    """Every figure: the config, per-seed records, summary rows, checks."""
    with open(path, 'w') as f:
        json.dump(dict(config=config, wall_s=wall_s, runs=list(records),
                       summary=list(rows), check=check,
                       storage_checks=list(storage_checks)), f, indent=1)
