"""Summaries of benchmark rows: medians, targets, Markdown, JSON and plots."""
from __future__ import annotations

import json
import re
import statistics
from typing import Dict, List, Optional, Sequence

from .margins import LABELS
from .worker import PHASES

#: The ratios :func:`ratio_checks` can compare with a limit (head only, at
#: the same C): key -> name. Partial FC at sample rate 0.1 against model
#: parallel, and its compact storages against the fp32 shard's bytes and
#: the fp32 PFC0.1 step. The limits are the caller's
#: (``tools/benchmark.py``).
RATIOS = {
    'time': 'PFC0.1 step / MP step',
    'memory': 'PFC0.1 peak / MP peak',
    'shard': 'PFC0.1 peak / shard fp32 weight',
    'gemm': 'MP step / its 3 GEMMs alone',
    'shard_bf16_bf16': 'PFC0.1 bf16/bf16 peak / shard fp32 weight',
    'time_bf16_bf16': 'PFC0.1 bf16/bf16 step / PFC0.1 step',
    'shard_bf16_int8': 'PFC0.1 bf16/int8 peak / shard fp32 weight',
    'time_bf16_int8': 'PFC0.1 bf16/int8 step / PFC0.1 step',
}
#: Row label of each compact storage with ratios: storage -> label.
COMPACT_ROWS = {'bf16_bf16': 'PFC0.1 bf16/bf16',
                'bf16_int8': 'PFC0.1 bf16/int8'}
#: Row label of each margin with ratios (against the ArcFace PFC0.1 row of
#: the same C and run): margin name -> label.
MARGIN_ROWS = {name: f'PFC0.1 {label}' for name, label in LABELS.items()
               if label}
for _name, _label in MARGIN_ROWS.items():
    RATIOS[f'time_{_name}'] = f'{_label} step / PFC0.1 step'
    RATIOS[f'memory_{_name}'] = f'{_label} peak / PFC0.1 peak'
#: Sub-center ArcFace (K centers per identity) against ArcFace over as many
#: rows (the PFC0.1 row of K x C identities); ``{k}`` is K.
RATIOS['time_subcenter'] = 'PFC0.1 SubCenter{k} step / PFC0.1 step at {k} x C'
RATIOS['memory_subcenter'] = ('PFC0.1 SubCenter{k} peak / PFC0.1 peak at '
                              '{k} x C')
SUBCENTER_ROW = re.compile(r'PFC0\.1 SubCenter(\d+)')


def summarize_launch(ranks: Sequence[dict]) -> dict:
    """One launch: per-step maxima over ranks, medians over steps."""
    steps = len(ranks[0]['times'].get('head', []))
    phase = {
        name: statistics.median(
            max(r['times'][name][i] for r in ranks) for i in range(steps))
        for name in PHASES if name in ranks[0]['times'] and steps}
    step = statistics.median(
        max(sum(r['times'][name][i] for name in PHASES
                if name in r['times']) for r in ranks)
        for i in range(steps)) if steps else float('nan')
    out = dict(step_s=step, phases_s=phase,
               peak_mb=max(r['peak_mb'] for r in ranks),
               steady_mb=max(r['steady_mb'] for r in ranks),
               reserved_peak_mb=max((r.get('reserved_peak_mb') or 0.0
                                     for r in ranks), default=0.0) or None,
               phase_peak_mb={k: max(r['phase_peak_mb'].get(k, 0.0)
                                     for r in ranks)
                              for k in ranks[0]['phase_peak_mb']},
               loss=ranks[0]['loss'], device=ranks[0]['device'],
               num_local=ranks[0]['num_local'],
               rows_per_step=ranks[0]['rows_per_step'])
    if 'gemm' in ranks[0]:
        out['gemm_parts_s'] = {k: max(r['gemm'][k] for r in ranks)
                               for k in ranks[0]['gemm']}
        out['gemm_s'] = max(sum(r['gemm'].values()) for r in ranks)
    return out


def merge_runs(record: dict, runs: List[dict]) -> dict:
    """Median over repeated launches of one row, plus the per-run values."""
    if not runs:
        return record
    med = statistics.median
    record.update(
        status='ok', runs=len(runs),
        step_s=med(r['step_s'] for r in runs),
        step_runs_s=[r['step_s'] for r in runs],
        phases_s={k: med(r['phases_s'][k] for r in runs)
                  for k in runs[0]['phases_s']},
        peak_mb=med(r['peak_mb'] for r in runs),
        peak_runs_mb=[r['peak_mb'] for r in runs],
        steady_mb=med(r['steady_mb'] for r in runs),
        reserved_peak_mb=None if runs[0].get('reserved_peak_mb') is None else
        med(r['reserved_peak_mb'] for r in runs),
        phase_peak_mb={k: med(r['phase_peak_mb'][k] for r in runs)
                       for k in runs[0]['phase_peak_mb']},
        loss=runs[-1]['loss'], device=runs[-1]['device'],
        num_local=runs[0]['num_local'],
        rows_per_step=runs[0]['rows_per_step'])
    record['samples_per_s'] = (record['world_size'] * record['batch_size']
                               / record['step_s'])
    if 'gemm_s' in runs[0]:
        record['gemm_s'] = med(r['gemm_s'] for r in runs)
        record['gemm_parts_s'] = {k: med(r['gemm_parts_s'][k] for r in runs)
                                  for k in runs[0]['gemm_parts_s']}
    return record


def _shard_mb(rec: dict) -> float:
    return rec['num_local'] * rec['embedding_size'] * 4 / 2**20


def ratio_checks(records: Sequence[dict], limits: Dict[str, float],
                 min_classes: int = 0) -> List[dict]:
    """The :data:`RATIOS` of every C whose head-only rows they need (MP,
    PFC0.1, the :data:`COMPACT_ROWS`, the :data:`MARGIN_ROWS`, sub-center
    rows and the PFC0.1 row at K x C), each against ``limits[key]``; a
    ratio whose rows are missing is left out; C below ``min_classes`` gets
    the ratios without a verdict (``passed=None``)."""
    unknown = sorted(set(limits) - set(RATIOS))
    if unknown:
        raise ValueError(f'unknown ratio keys {unknown}; expected some of '
                         f'{sorted(RATIOS)}')
    found = {}
    for rec in records:
        if rec.get('status') == 'ok' and not rec.get('backbone'):
            found[(rec['num_classes'], rec['label'])] = rec
    checks = []
    for classes in sorted({c for c, _ in found}):
        mp = found.get((classes, 'MP'))
        pfc = found.get((classes, 'PFC0.1'))
        values = {}
        if mp is not None:
            values['gemm'] = mp['step_s'] / mp['gemm_s'] \
                if mp.get('gemm_s') else None
            if pfc is not None:
                values.update(time=pfc['step_s'] / mp['step_s'],
                              memory=pfc['peak_mb'] / mp['peak_mb'],
                              shard=pfc['peak_mb'] / _shard_mb(mp))
        for storage, label in COMPACT_ROWS.items():
            rec = found.get((classes, label))
            if rec is None:
                continue
            values[f'shard_{storage}'] = rec['peak_mb'] / _shard_mb(rec)
            if pfc is not None:
                values[f'time_{storage}'] = rec['step_s'] / pfc['step_s']
        for name, label in MARGIN_ROWS.items():
            rec = found.get((classes, label))
            if rec is not None and pfc is not None:
                values[f'time_{name}'] = rec['step_s'] / pfc['step_s']
                values[f'memory_{name}'] = rec['peak_mb'] / pfc['peak_mb']
        names = {}
        for label in sorted(lab for c, lab in found if c == classes):
            match = SUBCENTER_ROW.fullmatch(label)
            k = int(match.group(1)) if match else 0
            ref = found.get((k * classes, 'PFC0.1'))
            if ref is None or 'time_subcenter' in values:
                continue  # no yardstick, or another K has the keys
            rec = found[(classes, label)]
            values.update(time_subcenter=rec['step_s'] / ref['step_s'],
                          memory_subcenter=rec['peak_mb'] / ref['peak_mb'])
            for key in ('time_subcenter', 'memory_subcenter'):
                names[key] = RATIOS[key].format(k=k)
        for key, limit in limits.items():
            if values.get(key) is not None:
                passed = values[key] <= limit \
                    if classes >= min_classes else None
                checks.append(dict(num_classes=classes,
                                   target=names.get(key, RATIOS[key]),
                                   value=values[key], limit=limit,
                                   passed=passed, min_classes=min_classes))
    return checks


def verdict(check: dict) -> str:
    if check['passed'] is None:
        return f"- (set for >= {check['min_classes']:,})"
    return 'PASS' if check['passed'] else 'FAIL'


def _not_ok(rec: Optional[dict]) -> str:
    """The cell of a row that has no figure: ``-`` (absent or does not
    fit), ``n/a`` (not available in this version) or ``failed``."""
    if rec is None or rec.get('status') == 'does not fit':
        return '-'
    return 'n/a' if rec.get('status') == 'not available' else 'failed'


def _fmt_speed(rec: Optional[dict]) -> str:
    if rec is None or rec.get('status') != 'ok':
        return _not_ok(rec)
    value = rec['samples_per_s']
    return f'{value:.0f}' if value >= 100 else f'{value:.3g}'


def _fmt_mem(rec: Optional[dict]) -> str:
    if rec is None or rec.get('status') != 'ok':
        return _not_ok(rec)
    return f"{rec['peak_mb']:.0f}"


def markdown(records: Sequence[dict], checks: Sequence[dict]) -> str:
    """The reference's table layout (speed and memory per method and C), a
    detailed table and the ratio checks."""
    labels = list(dict.fromkeys(r['label'] for r in records))
    by_key = {(r['num_classes'], r['label']): r for r in records}
    classes = sorted({r['num_classes'] for r in records})
    head = ['identities', *[f'{m} speed' for m in labels],
            *[f'{m} mem' for m in labels]]
    lines = ['| ' + ' | '.join(head) + ' |',
             '|' + '---|' * len(head)]
    for c in classes:
        cells = [f'{c:,}'] + [_fmt_speed(by_key.get((c, m))) for m in labels]
        cells += [_fmt_mem(by_key.get((c, m))) for m in labels]
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'Speed: samples/s of the global batch (larger is better). '
              'Memory: peak MB per rank above the process baseline '
              '(smaller is better); `-`: does not fit the memory budget.'
              + (' `n/a`: not available in this version.' if any(
                  r.get('status') == 'not available' for r in records)
                 else ''),
              '', '| identities | method | samples/s | step ms | backbone ms '
              '| head ms | optimizer ms | peak MB | predicted MB | '
              'measured / predicted | 3 GEMMs ms |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for c in classes:
        for m in labels:
            rec = by_key.get((c, m))
            if rec is None:
                continue
            pred = rec.get('predicted_mb')
            if rec.get('status') != 'ok':
                lines.append(f'| {c:,} | {m} | {status_text(rec)} | | | | | '
                             f'| {pred:.0f} | | |')
                continue
            ph = {k: 1e3 * v for k, v in rec['phases_s'].items()}
            gemm = rec.get('gemm_s')
            backbone = ph.get('backbone_forward', 0) + ph.get(
                'backbone_backward', 0)
            lines.append(
                f"| {c:,} | {m} | {_fmt_speed(rec)} | "
                f"{1e3 * rec['step_s']:.0f} | {backbone:.0f} | "
                f"{ph.get('head', 0):.0f} | {ph.get('optimizer', 0):.0f} | "
                f"{rec['peak_mb']:.0f} | {pred:.0f} | "
                f"{rec['peak_mb'] / pred:.2f} | "
                + (f'{1e3 * gemm:.0f} |' if gemm else '- |'))
    if checks:
        lines += ['', '| identities | target | value | limit | result |',
                  '|---|---|---|---|---|']
        for chk in checks:
            lines.append(
                f"| {chk['num_classes']:,} | {chk['target']} | "
                f"{chk['value']:.3f} | {chk['limit']:.3f} | "
                f"{verdict(chk)} |")
    return '\n'.join(lines)


def plot(records: Sequence[dict], path_prefix: str) -> List[str]:
    """``<prefix>speed.png`` (log-log) and ``<prefix>memory.png`` (log x)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = list(dict.fromkeys(r['label'] for r in records))
    paths = []
    for key, ylabel, name in (('samples_per_s', 'samples / s', 'speed'),
                              ('peak_mb', 'peak MB per rank', 'memory')):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for i, label in enumerate(labels):
            rows = sorted((r for r in records if r['label'] == label),
                          key=lambda r: r['num_classes'])
            ok = [r for r in rows if r.get('status') == 'ok']
            color = f'C{i}'
            ax.plot([r['num_classes'] for r in ok], [r[key] for r in ok],
                    'o-', color=color, label=label)
            if key == 'peak_mb':
                ax.plot([r['num_classes'] for r in rows],
                        [r['predicted_mb'] for r in rows], 'x--',
                        color=color, alpha=0.6, label=f'{label} predicted')
        budgets = {r['budget_mb'] for r in records if r.get('budget_mb')}
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


def write_json(path: str, config: dict, records: Sequence[dict],
               checks: Sequence[dict]) -> None:
    with open(path, 'w') as f:
        json.dump(dict(config=config, rows=list(records),
                       targets=list(checks)), f, indent=1)


def status_text(rec: dict) -> str:
    """A row that did not run: its status and, when it does not fit, the
    most identities the model says would."""
    if rec.get('status') == 'does not fit' and rec.get('max_classes') \
            is not None:
        return f"does not fit (fits <= {rec['max_classes']:,})"
    if rec.get('status') == 'not available' and rec.get('error'):
        return rec['error']
    return rec['status']


def progress_line(rec: dict) -> str:
    """One line per launch, printed as the benchmark goes."""
    head = f"{rec['label']:>8s} C={rec['num_classes']:>11,}"
    pred = f"predicted {rec['predicted_mb']:.0f} MB"
    if rec.get('status') != 'ok':
        return f'{head}: {status_text(rec)} ({pred})'
    ph: Dict[str, float] = rec['phases_s']
    backbone = ph.get('backbone_forward', 0) + ph.get('backbone_backward', 0)
    split = (f"backbone {1e3 * backbone:.0f} + head "
             f"{1e3 * ph.get('head', 0):.0f} + optimizer "
             f"{1e3 * ph.get('optimizer', 0):.0f} ms")
    gemm = (f", 3 GEMMs {1e3 * rec['gemm_s']:.0f} ms"
            if rec.get('gemm_s') else '')
    return (f"{head}: {rec['samples_per_s']:.1f} samples/s, step "
            f"{1e3 * rec['step_s']:.0f} ms ({split}){gemm}, peak "
            f"{rec['peak_mb']:.0f} MB/rank, {pred}")
