"""The benchmark: methods x identity counts, each launched on W fresh ranks.

Example (the 1M-identity head-only comparison)::

    from mmpfc.benchmark.speed import BenchmarkConfig, run_benchmark
    records = run_benchmark(BenchmarkConfig(
        methods=['mp', 'pfc0.1'], num_classes=[1_000_000], world_size=2))

The sharded methods (MP, PFC) run once per storage of ``cfg.storage``
(center dtype / optimizer-state dtype pairs, e.g. ``('bfloat16', 'int8')``),
labelled ``PFC0.1 bf16/int8`` when not fp32; DP always runs in fp32.
They also run once per margin of ``cfg.margins`` (:mod:`..margins`),
labelled ``PFC0.1 CurricularFace``; ArcFace, the default, keeps the plain
label, and a sub-center row (``subcenter3``) brings an ArcFace row of
K x C identities along, its yardstick (not run where the head has no
sub-centers: the sub-center row is then "not available").
Rows whose predicted memory (:mod:`..memory_model`) exceeds the per-rank
budget are reported as "does not fit", with the most identities that would
fit, and not started. With ``repeat > 1``
the whole set of rows runs again (interleaved, so slow periods of a shared
machine hit every method alike) and each figure is the median of the runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mmpfc.utils.proc_memory import proc_kb
from mmpfc.utils.spawn import threads_per_rank

from ..head_methods import HeadMethod, parse_method
from ..launcher import RowFailed, launch
from ..margins import (DEFAULT_MARGIN, SUBCENTERS_MISSING, MarginSpec,
                       parse_margin, subcenters_available)
from ..memory_model import (activation_bytes_per_sample, check_dtypes,
                            max_num_classes, predict_memory, shard_rows)
from .report import merge_runs, progress_line, summarize_launch
from .rows import (FP32_STORAGE, MB, BenchmarkRecord, BenchmarkRow,
                   LaunchSummary, row_label)
from .worker import IMAGE_SHAPE, backbone_config, run_rank


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
    storage: Sequence[Tuple[str, str]] = (FP32_STORAGE, )
    margins: Sequence[str] = (DEFAULT_MARGIN, )
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
    """Parameter count and saved activations per sample of the backbone.

    A CUDA run's activations are measured on a virtual GPU under CUDA
    autocast (fp16), a CPU run's by a CPU forward under CPU autocast
    (bf16): the two keep different dtypes.
    """
    bb_cfg = backbone_config(cfg.backbone, cfg.embedding_size)
    if bb_cfg is None:
        return {}
    input_bytes = 4 * IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    if cfg.device == 'cuda':
        from ..gpu_memory import model_figures
        figures = model_figures(
            dict(type='FaceRecognizer', backbone=bb_cfg, head=None),
            IMAGE_SHAPE, amp=cfg.amp)
        return dict(backbone_params=figures.params,
                    largest_param=figures.largest_param,
                    activation_bytes=figures.activations.per_sample,
                    activation_fixed=figures.activations.fixed,
                    input_bytes=input_bytes)
    import mmpfc  # noqa: F401
    from mmpfc.registry import MODELS
    model = MODELS.build(bb_cfg)
    return dict(
        backbone_params=sum(p.numel() for p in model.parameters()),
        largest_param=max(p.numel() for p in model.parameters()),
        activation_bytes=activation_bytes_per_sample(
            model, IMAGE_SHAPE, torch.bfloat16 if cfg.amp else None),
        input_bytes=input_bytes)


def memory_kwargs(row: BenchmarkRow, stats: dict) -> dict:
    """:func:`..memory_model.predict_memory` kwargs of a row but for C."""
    return dict(method=row.method, world_size=row.world_size,
                embedding_size=row.embedding_size,
                batch_size=row.batch_size, sample_rate=row.sample_rate,
                center_dtype=row.center_dtype, state_dtype=row.state_dtype,
                non_target_margin=row.modifies_non_target,
                num_subcenters=row.num_subcenters, **stats)


def margin_fields(spec: MarginSpec) -> dict:
    """The :class:`~.rows.BenchmarkRow` fields of a margin (the worker
    builds the head from them); ArcFace leaves them at their defaults,
    and builds the default head."""
    return dict(margin=spec.name,
                loss=None if spec.loss is None else dict(spec.loss),
                num_subcenters=spec.num_subcenters,
                embedding_norms=spec.embedding_norms,
                modifies_non_target=spec.modifies_non_target)


def _variants(method: HeadMethod, storages: Sequence[Tuple[str, str]],
              margins: Sequence[MarginSpec]
              ) -> List[Tuple[Tuple[str, str], MarginSpec]]:
    """The (storage, margin) pairs a method runs with: every one for the
    sharded head, fp32 ArcFace for DP (it replicates fp32 centers)."""
    if not method.sharded:
        return [(FP32_STORAGE, parse_margin(DEFAULT_MARGIN))]
    return [(storage, margin) for storage in storages for margin in margins]


def make_rows(cfg: BenchmarkConfig,
              stats: Optional[dict] = None) -> List[BenchmarkRow]:
    """Every (identities, method, storage, margin) row, with its predicted
    memory (``stats``: :func:`backbone_stats`, computed when not given).

    A sub-center row (K centers per identity) whose head exists brings the
    ArcFace row of the same method and storage at K x C identities, unless
    it is already there; where the head has no sub-centers the row says so
    (``unavailable``) and brings nothing.
    """
    if stats is None:
        stats = backbone_stats(cfg)
    storages = [tuple(s) for s in cfg.storage] or [FP32_STORAGE]
    for center, state in storages:
        check_dtypes(center, state)
    margins = [parse_margin(m) for m in cfg.margins] or [
        parse_margin(DEFAULT_MARGIN)]
    have_subcenters = any(m.num_subcenters != 1 for m in margins) \
        and subcenters_available()
    rows, references = [], []
    for classes in cfg.num_classes:
        for method in map(parse_method, cfg.methods):
            for storage, margin in _variants(method, storages, margins):
                row = _make_row(cfg, stats, method, int(classes), storage,
                                margin)
                if margin.num_subcenters != 1 and not have_subcenters:
                    row = replace(row, unavailable=SUBCENTERS_MISSING)
                elif margin.num_subcenters != 1:
                    references.append(_make_row(
                        cfg, stats, method,
                        margin.num_subcenters * int(classes), storage,
                        parse_margin(DEFAULT_MARGIN)))
                rows.append(row)
    present = {(r.label, r.num_classes) for r in rows}
    for ref in references:
        if (ref.label, ref.num_classes) not in present:
            present.add((ref.label, ref.num_classes))
            rows.append(ref)
    return rows


def _make_row(cfg: BenchmarkConfig, stats: dict, method: HeadMethod,
              classes: int, storage: Tuple[str, str],
              margin: MarginSpec) -> BenchmarkRow:
    center, state = storage
    row = BenchmarkRow(
        label=row_label(method.label, center, state, margin.label),
        method=method.method, sample_rate=method.sample_rate,
        num_classes=classes, center_dtype=center, state_dtype=state,
        world_size=cfg.world_size, batch_size=cfg.batch_size,
        embedding_size=cfg.embedding_size,
        backbone=None if cfg.backbone in (None, 'none') else cfg.backbone,
        amp=cfg.amp, device=cfg.device, steps=cfg.steps,
        warmup=cfg.warmup, threads=cfg.resolved_threads(), seed=cfg.seed,
        gemm=cfg.gemm and method.sharded, **margin_fields(margin))
    estimate = predict_memory(num_classes=classes,
                              **memory_kwargs(row, stats))
    return replace(
        row, predicted_mb=estimate.peak / MB,
        predicted_parts_mb={k: v / MB for k, v in estimate.parts.items()},
        shard_mb=shard_rows(classes, cfg.world_size)
        * margin.num_subcenters * cfg.embedding_size * 4 / MB)


def run_benchmark(cfg: BenchmarkConfig,
                  log: Callable[[str], None] = print
                  ) -> List[BenchmarkRecord]:
    """Run every row ``cfg.repeat`` times; returns the records."""
    stats = backbone_stats(cfg)
    budget = cfg.budget_bytes()
    rows = [replace(row, budget_mb=budget / MB)
            for row in make_rows(cfg, stats)]
    runs: List[List[LaunchSummary]] = [[] for _ in rows]
    records = [BenchmarkRecord(row) for row in rows]
    for rnd in range(cfg.repeat):
        for i, row in enumerate(rows):
            if row.unavailable:
                if rnd == 0:
                    records[i] = replace(records[i], status='not available',
                                         error=row.unavailable)
                    log(f'{row.label} C={row.num_classes:,}: '
                        f'{row.unavailable}')
            elif row.predicted_mb * MB > budget:
                if rnd == 0:
                    records[i] = _does_not_fit(row, stats, budget)
                    log(progress_line(records[i])
                        + f' > budget {budget / MB:.0f} MB')
            else:
                records[i] = _measure(cfg, row, runs[i], records[i], log,
                                      f'[{rnd + 1}/{cfg.repeat}] ')
    return records


def _does_not_fit(row: BenchmarkRow, stats: dict,
                  budget: float) -> BenchmarkRecord:
    """The record of a row above the budget, with the most identities
    that would fit it."""
    return BenchmarkRecord(row, status='does not fit',
                           max_classes=max_num_classes(
                               budget, **memory_kwargs(row, stats)))


def _measure(cfg: BenchmarkConfig, row: BenchmarkRow,
             runs: List[LaunchSummary], record: BenchmarkRecord,
             log: Callable[[str], None], progress: str) -> BenchmarkRecord:
    """Launch the row once more; its runs so far merged (a failure keeps
    the earlier runs' figures)."""
    try:
        ranks = launch(run_rank, row, cfg.world_size, cfg.timeout,
                       device=row.device)
    except RowFailed as err:
        if not runs:
            record = replace(record, status='failed', error=str(err))
        log(f'{row.label} C={row.num_classes:,}: FAILED '
            f'{str(err).splitlines()[0]}')
        return record
    runs.append(summarize_launch(ranks))
    record = merge_runs(row, runs)
    log(progress + progress_line(record))
    return record


def config_dict(cfg: BenchmarkConfig) -> dict:
    """The run's config as ``benchmark.json`` keeps it, with the threads
    and budget it resolved to."""
    out = asdict(cfg)
    out.update(threads=cfg.resolved_threads(),
               budget_mb=cfg.budget_bytes() / MB)
    return out
