"""What the speed benchmark runs and measures, one typed record per stage.

A :class:`BenchmarkRow` is one (identities, method, storage, margin) cell
of the table, as the runner plans it and the ranks run it (it crosses
process boundaries). Each rank answers with a :class:`RankResult`; a
launch of W ranks is summed up in a :class:`LaunchSummary`; the launches of
a row, merged, are its :class:`RowMeasurement`; and a
:class:`BenchmarkRecord` is the row with its status and, when it ran, its
measurement. :meth:`BenchmarkRecord.to_json` is the flat object
``benchmark.json`` keeps per row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Optional, Tuple

from ..margins import DEFAULT_MARGIN
from ..memory_model import check_dtypes

#: Spellings of the storage dtypes -> the names the head and the optim
#: wrapper take.
DTYPE_NAMES = {'fp32': 'float32', 'float32': 'float32', 'bf16': 'bfloat16',
               'bfloat16': 'bfloat16', 'fp16': 'float16', 'float16': 'float16',
               'int8': 'int8'}
SHORT_NAMES = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16',
               'int8': 'int8'}
FP32_STORAGE = ('float32', 'float32')
MB = 2**20
#: Fields of a row that ``benchmark.json`` leaves out at these defaults.
_OPTIONAL_FIELDS = MappingProxyType({
    'loss': None, 'num_subcenters': 1, 'embedding_norms': None,
    'modifies_non_target': False, 'unavailable': None, 'budget_mb': None})


def canonical_dtype(text: str) -> str:
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
    center, state = (canonical_dtype(parts[0]), canonical_dtype(parts[-1]))
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


@dataclass(frozen=True)
class BenchmarkRow:
    """One row: what its ranks build and run, and what the model predicts.

    The head options (``center_dtype``, ``state_dtype``, ``loss``,
    ``num_subcenters``) reach the head and the optim wrapper only when they
    differ from the defaults, so an fp32 ArcFace row builds exactly the
    head it always did. ``embedding_norms`` (``(low, high)``) rescales the
    head-only embeddings for the margins that read the norms.
    ``unavailable`` says why a row cannot run in this version;
    ``budget_mb`` is the per-rank budget of the run that holds it.
    """
    label: str
    method: str
    sample_rate: float
    num_classes: int
    center_dtype: str = 'float32'
    state_dtype: str = 'float32'
    world_size: int = 2
    batch_size: int = 128
    embedding_size: int = 512
    backbone: Optional[str] = None
    amp: bool = False
    device: str = 'cpu'
    steps: int = 5
    warmup: int = 2
    threads: int = 1
    seed: int = 2048
    gemm: bool = True
    margin: str = DEFAULT_MARGIN
    loss: Optional[Dict[str, Any]] = None
    num_subcenters: int = 1
    embedding_norms: Optional[Tuple[float, float]] = None
    modifies_non_target: bool = False
    predicted_mb: float = 0.0
    predicted_parts_mb: Dict[str, float] = field(default_factory=dict)
    shard_mb: float = 0.0
    unavailable: Optional[str] = None
    budget_mb: Optional[float] = None

    @property
    def storage(self) -> Tuple[str, str]:
        return self.center_dtype, self.state_dtype

    @property
    def head_only(self) -> bool:
        return not self.backbone

    def to_json(self) -> Dict[str, Any]:
        """Every field but the optional ones at their default, which
        ``benchmark.json`` never had (plain ArcFace fp32 rows keep their
        keys)."""
        return {key: value for key, value in asdict(self).items()
                if key not in _OPTIONAL_FIELDS
                or value != _OPTIONAL_FIELDS[key]}


@dataclass(frozen=True)
class RankResult:
    """What one rank measured of one launch (seconds and MB above the
    rank's baseline; ``gemm``: the head's three GEMMs alone, when timed)."""
    rank: int
    device: str
    num_local: int
    rows_per_step: int
    times: Dict[str, List[float]]
    phase_peak_mb: Dict[str, float]
    peak_mb: float
    steady_mb: float
    reserved_peak_mb: Optional[float]
    baseline_mb: float
    loss: float
    gemm: Optional[Dict[str, float]] = None


@dataclass(frozen=True)
class LaunchSummary:
    """One launch: per-step maxima over the ranks, medians over steps."""
    step_s: float
    phases_s: Dict[str, float]
    peak_mb: float
    steady_mb: float
    reserved_peak_mb: Optional[float]
    phase_peak_mb: Dict[str, float]
    loss: float
    device: str
    num_local: int
    rows_per_step: int
    gemm_parts_s: Optional[Dict[str, float]] = None
    gemm_s: Optional[float] = None


@dataclass(frozen=True)
class RowMeasurement:
    """A row's launches merged: medians, and the per-run values."""
    runs: int
    step_s: float
    step_runs_s: List[float]
    phases_s: Dict[str, float]
    peak_mb: float
    peak_runs_mb: List[float]
    steady_mb: float
    reserved_peak_mb: Optional[float]
    phase_peak_mb: Dict[str, float]
    loss: float
    device: str
    num_local: int
    rows_per_step: int
    samples_per_s: float
    gemm_s: Optional[float] = None
    gemm_parts_s: Optional[Dict[str, float]] = None

    def to_json(self) -> Dict[str, Any]:
        """Every figure; the GEMM times only where they were timed."""
        out = asdict(self)
        if self.gemm_s is None:
            del out['gemm_s'], out['gemm_parts_s']
        return out


@dataclass(frozen=True)
class BenchmarkRecord:
    """A row and what became of it.

    ``status`` is ``'ok'`` (``measured`` holds the figures), ``'not run'``,
    ``'not available'`` or ``'failed'`` (``error`` says why) or
    ``'does not fit'`` (``max_classes``: the most identities the model
    says would).
    """
    row: BenchmarkRow
    status: str = 'not run'
    error: Optional[str] = None
    max_classes: Optional[int] = None
    measured: Optional[RowMeasurement] = None

    @property
    def ok(self) -> bool:
        return self.status == 'ok' and self.measured is not None

    def shard_fp32_mb(self) -> float:
        """MB of this rank's shard of the centers in fp32: the yardstick
        of the compact storages' memory."""
        assert self.measured is not None
        return self.measured.num_local * self.row.embedding_size * 4 / MB

    def to_json(self) -> Dict[str, Any]:
        """The row's fields, its status, then its figures, in one object
        (a figure that shares a row field's name, ``loss`` and ``device``,
        takes its place)."""
        out = self.row.to_json()
        out['status'] = self.status
        if self.error is not None:
            out['error'] = self.error
        if self.max_classes is not None:
            out['max_classes'] = self.max_classes
        if self.measured is not None:
            out.update(self.measured.to_json())
        return out
