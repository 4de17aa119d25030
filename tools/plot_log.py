"""Plot loss, speed, learning rate and memory of a training run as one PNG.

    python tools/plot_log.py work_dirs/mbf_pfc0.1_demo_cpu [-o curves.png]
    python tools/plot_log.py work_dirs/x/20250101_120000/vis_data/scalars.json

Reads MMEngine's ``LocalVisBackend`` log, ``<work_dir>/<timestamp>/vis_data/
scalars.json`` (one JSON dict per line, with its ``step``); given a work dir
it takes the newest run (the latest timestamp) that has one. Draws one
subplot per quantity against the step: loss, speed (``train/speed`` or
``speed``), lr and every memory key present (``mem_used_mb`` from
``MemoryTableHook``, ``memory`` from MMEngine on GPUs). Writes
``scalars.png`` next to the ``scalars.json`` unless ``-o`` says where.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence, Tuple

# subplot title -> the keys that make it, in the order they are looked for
QUANTITIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ('loss', ('loss', 'train/loss')),
    ('speed (samples/s)', ('speed', 'train/speed')),
    ('lr', ('lr', 'train/lr')),
)
MEMORY_KEY = re.compile(r'(^|/)(mem|memory)(_|$)')
Series = Dict[str, List[Tuple[float, float]]]


def find_scalars(path: str) -> str:
    """``path`` itself if it is a file, else the newest ``scalars.json`` of
    the work dir (or run dir, or ``vis_data`` dir) ``path``.
    """
    if osp.isfile(path):
        return path
    for direct in ('scalars.json', osp.join('vis_data', 'scalars.json')):
        if osp.isfile(osp.join(path, direct)):
            return osp.join(path, direct)
    runs = sorted(glob.glob(osp.join(glob.escape(path), '*', 'vis_data',
                                     'scalars.json')))
    if not runs:
        raise FileNotFoundError(
            f'no scalars.json in {path!r} (looked for scalars.json, '
            f'vis_data/scalars.json and <timestamp>/vis_data/scalars.json); '
            f'is it a work dir of a run with LocalVisBackend?')
    return runs[-1]


def read_scalars(path: str) -> List[dict]:
    """The JSON dicts of ``scalars.json``, one per non-empty line."""
    records = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f'{path}, line {number}: not JSON ({e.msg}): '
                    f'{line.strip()[:80]!r}') from None
            if not isinstance(record, dict):
                raise ValueError(f'{path}, line {number}: a JSON '
                                 f'{type(record).__name__}, not a dict')
            records.append(record)
    return records


def collect(records: Sequence[dict]) -> Tuple[Dict[str, Series], List[str]]:
    """Points (step, value) per subplot and per key, and the keys found.

    A record's x is its ``step`` (``iter`` if it has none); records with
    neither, and non-numeric values, are skipped.
    """
    keys = sorted({k for r in records for k in r})
    panels: Dict[str, List[str]] = {}
    for title, candidates in QUANTITIES:
        found = [k for k in candidates if k in keys]
        if found:
            panels[title] = found[:1]
    memory = [k for k in keys if MEMORY_KEY.search(k)]
    if memory:
        panels['memory (MB)'] = memory
    data: Dict[str, Series] = {}
    for title, panel_keys in panels.items():
        series: Series = {k: [] for k in panel_keys}
        for record in records:
            x = record.get('step', record.get('iter'))
            if not isinstance(x, (int, float)):
                continue
            for k in panel_keys:
                value = record.get(k)
                if isinstance(value, (int, float)) and not isinstance(
                        value, bool):
                    series[k].append((float(x), float(value)))
        data[title] = series
    return data, [k for ks in panels.values() for k in ks]


def plot(data: Dict[str, Series], out: str, title: str = '') -> None:
    """One subplot per quantity, stacked, sharing the step axis."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data), 1, sharex=True, squeeze=False,
                             figsize=(7, 2.2 * len(data) + 0.6))
    for ax, (name, series) in zip(axes[:, 0], data.items()):
        for key, points in series.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker='.', label=key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    axes[-1, 0].set_xlabel('step')
    if title:
        fig.suptitle(title, fontsize='small')
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('path', help='a work dir, a run dir or scalars.json')
    parser.add_argument('-o', '--out', help='the PNG to write (default: '
                        'scalars.png next to scalars.json)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Plot the run named on the command line; returns the keys plotted."""
    args = parse_args(argv)
    scalars = find_scalars(args.path)
    data, keys = collect(read_scalars(scalars))
    if not keys:
        raise ValueError(f'{scalars}: none of loss, speed, lr or a memory '
                         'key in any line')
    out = args.out or osp.join(osp.dirname(scalars), 'scalars.png')
    if osp.dirname(out):
        os.makedirs(osp.dirname(out), exist_ok=True)
    plot(data, out, title=scalars)
    print(f'plotted {", ".join(keys)} from {scalars} to {out}')
    return keys


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'plot_log.py: {e}')
