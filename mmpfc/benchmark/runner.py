"""The benchmark: methods x identity counts, each launched on W fresh ranks.

Example (the 1M-identity head-only comparison)::

    from mmpfc.benchmark import BenchmarkConfig, run_benchmark
    records = run_benchmark(BenchmarkConfig(
        methods=['mp', 'pfc0.1'], num_classes=[1_000_000], world_size=2))

Rows whose predicted memory (:mod:`.memory_model`) exceeds the per-rank
budget are reported as "does not fit" and not started. With ``repeat > 1``
the whole set of rows runs again (interleaved, so slow periods of a shared
machine hit every method alike) and each figure is the median of the runs.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence

import torch

from mmpfc.utils.proc_memory import proc_kb
from mmpfc.utils.spawn import threads_per_rank
from .launcher import RowFailed, launch
from .memory_model import (activation_bytes_per_sample, predict_memory,
                           shard_rows)
from .report import merge_runs, summarize_launch
from .worker import IMAGE_SHAPE, backbone_config


def parse_method(spec: str) -> dict:
    """``'dp'``, ``'mp'`` or ``'pfc<rate>'`` (e.g. ``'pfc0.1'``)."""
    text = spec.strip().lower()
    if text == 'dp':
        return dict(label='DP', method='dp', sample_rate=1.0)
    if text == 'mp':
        return dict(label='MP', method='pfc', sample_rate=1.0)
    match = re.fullmatch(r'pfc([0-9.]+)', text)
    if match:
        rate = float(match.group(1))
        if 0.0 <= rate <= 1.0:
            return dict(label=f'PFC{match.group(1)}' if rate < 1 else 'MP',
                        method='pfc', sample_rate=rate)
    raise ValueError(f"method {spec!r}: expected 'dp', 'mp' or 'pfc<rate>' "
                     "with a rate in [0, 1], e.g. 'pfc0.1'")


def parse_count(text: str) -> int:
    """``'1000000'``, ``'1,000,000'``, ``'1M'``, ``'125k'`` or ``'1e6'``."""
    raw = text.strip().replace(',', '').replace('_', '')
    scale = {'k': 10**3, 'm': 10**6}.get(raw[-1:].lower(), 1)
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        value = -1
    if value < 1 or value != int(value):
        raise ValueError(f'identity count {text!r} is not a positive integer')
    return int(value)


@dataclass
class BenchmarkConfig:
    """What to run; see ``tools/benchmark.py --help`` for each field."""
    methods: Sequence[str] = ('dp', 'mp', 'pfc0.1')
    num_classes: Sequence[int] = (1_000_000, )
    world_size: int = 2
    batch_size: int = 128
    embedding_size: int = 512
    backbone: Optional[str] = None
    amp: bool = False
    device: str = 'cpu'
    steps: int = 5
    warmup: int = 2
    repeat: int = 1
    threads: Optional[int] = None
    memory_budget_gb: Optional[float] = None
    gemm: bool = True
    seed: int = 2048
    timeout: float = 1800.0
    extra: dict = field(default_factory=dict)

    def resolved_threads(self) -> int:
        """Torch threads per rank: the option, else cores / ranks."""
        return threads_per_rank(self.world_size, self.threads)

    def budget_bytes(self) -> float:
        """Memory a rank may use: the option, else the device / host share."""
        if self.memory_budget_gb is not None:
            return self.memory_budget_gb * 2**30
        if self.device == 'cuda':
            return torch.cuda.get_device_properties(0).total_memory
        available = proc_kb('/proc/meminfo', 'MemAvailable')
        return 0.9 * available * 1024 / self.world_size if available \
            else float('inf')


def backbone_stats(cfg: BenchmarkConfig) -> dict:
    """Parameter count and saved activations per sample of the backbone."""
    bb_cfg = backbone_config(cfg.backbone, cfg.embedding_size)
    if bb_cfg is None:
        return {}
    import mmpfc  # noqa: F401
    from mmpfc.registry import MODELS
    model = MODELS.build(bb_cfg)
    amp_dtype = (torch.float16 if cfg.device == 'cuda' else torch.bfloat16) \
        if cfg.amp else None
    return dict(
        backbone_params=sum(p.numel() for p in model.parameters()),
        largest_param=max(p.numel() for p in model.parameters()),
        activation_bytes=activation_bytes_per_sample(model, IMAGE_SHAPE,
                                                     amp_dtype),
        input_bytes=4 * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2])


def make_rows(cfg: BenchmarkConfig) -> List[dict]:
    """Every (identities, method) row, with its predicted memory."""
    stats = backbone_stats(cfg)
    rows = []
    for classes in cfg.num_classes:
        for spec in cfg.methods:
            method = parse_method(spec)
            row = dict(method, num_classes=int(classes),
                       world_size=cfg.world_size, batch_size=cfg.batch_size,
                       embedding_size=cfg.embedding_size,
                       backbone=None if cfg.backbone in (None, 'none')
                       else cfg.backbone, amp=cfg.amp, device=cfg.device,
                       steps=cfg.steps, warmup=cfg.warmup,
                       threads=cfg.resolved_threads(), seed=cfg.seed,
                       gemm=cfg.gemm and method['method'] == 'pfc')
            estimate = predict_memory(
                method['method'], row['num_classes'], cfg.world_size,
                cfg.embedding_size, cfg.batch_size, method['sample_rate'],
                **stats)
            row.update(predicted_mb=estimate.peak / 2**20,
                       predicted_parts_mb={k: v / 2**20 for k, v in
                                           estimate.parts.items()},
                       shard_mb=shard_rows(row['num_classes'],
                                           cfg.world_size)
                       * cfg.embedding_size * 4 / 2**20)
            rows.append(row)
    return rows


def run_benchmark(cfg: BenchmarkConfig,
                  log: Callable[[str], None] = print
                  ) -> List[dict]:
    """Run every row ``cfg.repeat`` times; returns the records."""
    from .report import progress_line
    rows = make_rows(cfg)
    budget = cfg.budget_bytes()
    for row in rows:
        row['budget_mb'] = budget / 2**20
    runs: List[List[dict]] = [[] for _ in rows]
    records = [dict(row, status='not run') for row in rows]
    for rnd in range(cfg.repeat):
        for i, row in enumerate(rows):
            if row['predicted_mb'] * 2**20 > budget:
                records[i]['status'] = 'does not fit'
                if rnd == 0:
                    log(progress_line(records[i])
                        + f' > budget {budget / 2**20:.0f} MB')
                continue
            worker_row = {k: v for k, v in row.items()
                          if k not in ('predicted_parts_mb', )}
            try:
                ranks = launch(worker_row, cfg.world_size, cfg.timeout)
            except RowFailed as err:
                if not runs[i]:
                    records[i].update(status='failed', error=str(err))
                log(f"{row['label']} C={row['num_classes']:,}: FAILED "
                    f'{str(err).splitlines()[0]}')
                continue
            runs[i].append(summarize_launch(ranks))
            records[i] = merge_runs(dict(row), runs[i])
            log(f'[{rnd + 1}/{cfg.repeat}] ' + progress_line(records[i]))
    return records


def config_dict(cfg: BenchmarkConfig) -> dict:
    out = asdict(cfg)
    out.update(threads=cfg.resolved_threads(),
               budget_mb=cfg.budget_bytes() / 2**20)
    return out
