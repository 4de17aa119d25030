"""The benchmark: methods x identity counts, each launched on W fresh ranks.

Example (the 1M-identity head-only comparison)::

    from mmpfc.benchmark import BenchmarkConfig, run_benchmark
    records = run_benchmark(BenchmarkConfig(
        methods=['mp', 'pfc0.1'], num_classes=[1_000_000], world_size=2))

The sharded methods (MP, PFC) run once per storage of ``cfg.storage``
(center dtype / optimizer-state dtype pairs, e.g. ``('bfloat16', 'int8')``),
labelled ``PFC0.1 bf16/int8`` when not fp32; DP always runs in fp32.
They also run once per margin of ``cfg.margins`` (:mod:`.margins`),
labelled ``PFC0.1 CurricularFace``; ArcFace, the default, keeps the plain
label, and a sub-center row (``subcenter3``) brings an ArcFace row of
K x C identities along, its yardstick (not run where the head has no
sub-centers: the sub-center row is then "not available").
Rows whose predicted memory (:mod:`.memory_model`) exceeds the per-rank
budget are reported as "does not fit", with the most identities that would
fit, and not started. With ``repeat > 1``
the whole set of rows runs again (interleaved, so slow periods of a shared
machine hit every method alike) and each figure is the median of the runs.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from mmpfc.utils.proc_memory import proc_kb
from mmpfc.utils.spawn import threads_per_rank

from .launcher import RowFailed, launch
from .margins import (DEFAULT_MARGIN, SUBCENTERS_MISSING, MarginSpec,
                      parse_margin, subcenters_available)
from .memory_model import (activation_bytes_per_sample, check_dtypes,
                           max_num_classes, predict_memory, shard_rows)
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


#: Spellings of the storage dtypes -> the names the head and the optim
#: wrapper take.
DTYPE_NAMES = {'fp32': 'float32', 'float32': 'float32', 'bf16': 'bfloat16',
               'bfloat16': 'bfloat16', 'fp16': 'float16', 'float16': 'float16',
               'int8': 'int8'}
SHORT_NAMES = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16',
               'int8': 'int8'}
FP32_STORAGE = ('float32', 'float32')


def dtype_name(text: str) -> str:
    """``'bf16'`` or ``'bfloat16'`` -> ``'bfloat16'`` (also fp32, fp16,
    int8)."""
    name = DTYPE_NAMES.get(text.strip().lower())
    if name is None:
        raise ValueError(f'dtype {text!r}: expected one of '
                         f'{sorted(set(DTYPE_NAMES))}')
    return name


def parse_storage(spec: str) -> Tuple[str, str]:
    """``'CENTER/STATE'`` (e.g. ``'bf16/int8'``) or one name for both
    (``'fp32'``, ``'bf16'``) -> ``(center_dtype, state_dtype)``."""
    parts = spec.split('/')
    if len(parts) not in (1, 2) or not all(p.strip() for p in parts):
        raise ValueError(f'storage {spec!r}: expected CENTER/STATE, e.g. '
                         "'bf16/int8', or one dtype for both, e.g. 'fp32'")
    center, state = (dtype_name(parts[0]), dtype_name(parts[-1]))
    check_dtypes(center, state)
    return center, state


def storage_label(center_dtype: str, state_dtype: str) -> str:
    """``''`` for fp32 storage (labels stay as they were), else e.g.
    ``'bf16/int8'``."""
    if (center_dtype, state_dtype) == FP32_STORAGE:
        return ''
    return f'{SHORT_NAMES[center_dtype]}/{SHORT_NAMES[state_dtype]}'


def row_label(method_label: str, center_dtype: str = 'float32',
              state_dtype: str = 'float32', margin_label: str = '') -> str:
    """``'PFC0.1'`` for fp32 ArcFace, else e.g. ``'PFC0.1 bf16/int8'``,
    ``'PFC0.1 CurricularFace'``, ``'PFC0.1 bf16/int8 AdaFace'``."""
    parts = [method_label, storage_label(center_dtype, state_dtype),
             margin_label]
    return ' '.join(p for p in parts if p)


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
        from .gpu_memory import model_figures
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


def memory_kwargs(row: dict, stats: dict) -> dict:
    """:func:`.memory_model.predict_memory` kwargs of a row but for C."""
    kwargs = dict(method=row['method'], world_size=row['world_size'],
                  embedding_size=row['embedding_size'],
                  batch_size=row['batch_size'],
                  sample_rate=row['sample_rate'],
                  center_dtype=row.get('center_dtype', 'float32'),
                  state_dtype=row.get('state_dtype', 'float32'), **stats)
    if row.get('modifies_non_target'):
        kwargs.update(non_target_margin=True)
    if row.get('num_subcenters', 1) != 1:
        kwargs['num_subcenters'] = row['num_subcenters']
    return kwargs


def margin_fields(spec: MarginSpec) -> dict:
    """What a row carries of its margin (the worker builds the head from
    it); an ArcFace row gets its name only, and builds the default head."""
    fields = dict(margin=spec.name)
    if spec.loss is not None:
        fields['loss'] = dict(spec.loss)
    if spec.num_subcenters != 1:
        fields['num_subcenters'] = spec.num_subcenters
    if spec.embedding_norms is not None:
        fields['embedding_norms'] = spec.embedding_norms
    if spec.modifies_non_target:
        fields['modifies_non_target'] = True
    return fields


def make_rows(cfg: BenchmarkConfig,
              stats: Optional[dict] = None) -> List[dict]:
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
    have_subcenters = None
    rows, references = [], []
    for classes in cfg.num_classes:
        for spec in cfg.methods:
            method = parse_method(spec)
            sharded = method['method'] == 'pfc'
            # DP replicates fp32 centers with ArcFace: one row
            for center, state in (storages if sharded else [FP32_STORAGE]):
                for margin in (margins if sharded else
                               [parse_margin(DEFAULT_MARGIN)]):
                    row = _make_row(cfg, stats, method, int(classes), center,
                                    state, margin)
                    if margin.num_subcenters != 1:
                        if have_subcenters is None:
                            have_subcenters = subcenters_available()
                        if not have_subcenters:
                            row['unavailable'] = SUBCENTERS_MISSING
                        else:
                            references.append(_make_row(
                                cfg, stats, method,
                                margin.num_subcenters * int(classes), center,
                                state, parse_margin(DEFAULT_MARGIN)))
                    rows.append(row)
    present = {(r['label'], r['num_classes']) for r in rows}
    for ref in references:
        if (ref['label'], ref['num_classes']) not in present:
            present.add((ref['label'], ref['num_classes']))
            rows.append(ref)
    return rows


def _make_row(cfg: BenchmarkConfig, stats: dict, method: dict,
              classes: int, center: str, state: str,
              margin: MarginSpec) -> dict:
    row = dict(method, num_classes=classes,
               label=row_label(method['label'], center, state, margin.label),
               center_dtype=center, state_dtype=state,
               world_size=cfg.world_size, batch_size=cfg.batch_size,
               embedding_size=cfg.embedding_size,
               backbone=None if cfg.backbone in (None, 'none')
               else cfg.backbone, amp=cfg.amp, device=cfg.device,
               steps=cfg.steps, warmup=cfg.warmup,
               threads=cfg.resolved_threads(), seed=cfg.seed,
               gemm=cfg.gemm and method['method'] == 'pfc',
               **margin_fields(margin))
    estimate = predict_memory(num_classes=classes,
                              **memory_kwargs(row, stats))
    row.update(predicted_mb=estimate.peak / 2**20,
               predicted_parts_mb={k: v / 2**20 for k, v in
                                   estimate.parts.items()},
               shard_mb=shard_rows(classes, cfg.world_size)
               * margin.num_subcenters * cfg.embedding_size * 4 / 2**20)
    return row


def run_benchmark(cfg: BenchmarkConfig,
                  log: Callable[[str], None] = print
                  ) -> List[dict]:
    """Run every row ``cfg.repeat`` times; returns the records."""
    from .report import progress_line
    stats = backbone_stats(cfg)
    rows = make_rows(cfg, stats)
    budget = cfg.budget_bytes()
    for row in rows:
        row['budget_mb'] = budget / 2**20
    runs: List[List[dict]] = [[] for _ in rows]
    records = [dict(row, status='not run') for row in rows]
    for rnd in range(cfg.repeat):
        for i, row in enumerate(rows):
            if row.get('unavailable'):
                records[i].update(status='not available',
                                  error=row['unavailable'])
                if rnd == 0:
                    log(f"{row['label']} C={row['num_classes']:,}: "
                        f"{row['unavailable']}")
                continue
            if row['predicted_mb'] * 2**20 > budget:
                records[i]['status'] = 'does not fit'
                if rnd == 0:
                    kwargs = memory_kwargs(row, stats)
                    records[i]['max_classes'] = max_num_classes(
                        budget, kwargs.pop('method'),
                        kwargs.pop('world_size'), **kwargs)
                    log(progress_line(records[i])
                        + f' > budget {budget / 2**20:.0f} MB')
                continue
            worker_row = {k: v for k, v in row.items()
                          if k not in ('predicted_parts_mb', 'unavailable')}
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
