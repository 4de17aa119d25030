"""The ratios of head-only rows that the speed benchmark checks with limits.

Each :class:`Ratio` names the rows it compares by the fields that build
them (:class:`RowPick`: method, sample rate, storage, margin), never by
their label text, and which figure of each it divides (:class:`Operand`).
The limits are the caller's (``tools/benchmark.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..margins import DEFAULT_MARGIN, LABELS
from .rows import (FP32_STORAGE, SHORT_NAMES, BenchmarkRecord, BenchmarkRow,
                   row_label)

#: Figures a ratio can divide: the step, the peak, the fp32 bytes of the
#: row's shard of the centers, the head's three GEMMs alone.
STEP, PEAK, SHARD_FP32, GEMMS = 'step', 'peak', 'shard_fp32', 'gemms'
#: The margin of :class:`RowPick` that matches any sub-center row.
ANY_SUBCENTERS = 'subcenter<K>'
#: Compact storages compared with the fp32 shard and the fp32 PFC0.1 step.
COMPACT_STORAGES = (('bfloat16', 'bfloat16'), ('bfloat16', 'int8'))
#: Margins compared with the ArcFace PFC0.1 row of the same C and run.
RATIO_MARGINS = tuple(name for name, label in LABELS.items() if label)


@dataclass(frozen=True)
class RowPick:
    """A head-only sharded row of a run, by what builds it."""
    sample_rate: float
    storage: Tuple[str, str] = FP32_STORAGE
    margin: str = DEFAULT_MARGIN

    def matches(self, row: BenchmarkRow) -> bool:
        if self.margin == ANY_SUBCENTERS:
            margin_matches = row.num_subcenters > 1
        else:
            margin_matches = row.margin == self.margin
        return (row.method == 'pfc' and row.sample_rate == self.sample_rate
                and row.storage == self.storage and margin_matches)


@dataclass(frozen=True)
class Operand:
    """One side of a ratio: a figure of a picked row. With
    ``at_subcenter_multiple`` the row is at K x C identities, K the
    numerator row's centers per identity (its yardstick)."""
    pick: RowPick
    figure: str
    at_subcenter_multiple: bool = False


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of the rows of one C; ``label`` is the
    check's target text (``{k}``: the numerator row's sub-centers)."""
    key: str
    numerator: Operand
    denominator: Operand
    label: str

    def evaluate(self, records: Sequence[BenchmarkRecord],
                 classes: int) -> Optional[Tuple[float, str]]:
        """The value and target text at ``classes`` identities, None when
        a row or a figure is missing. Of several numerator rows (sub-center
        rows of different K) the first, fewest centers first, whose
        denominator row ran."""
        tops = sorted(_picked(records, self.numerator.pick, classes),
                      key=lambda rec: rec.row.num_subcenters)
        for top in tops:
            k = top.row.num_subcenters
            bottom_classes = k * classes \
                if self.denominator.at_subcenter_multiple else classes
            bottom = next(iter(_picked(records, self.denominator.pick,
                                       bottom_classes)), None)
            if bottom is None:
                continue
            above = figure(top, self.numerator.figure)
            below = figure(bottom, self.denominator.figure)
            if above is None or not below:
                continue
            return above / below, self.label.format(k=k)
        return None


@dataclass(frozen=True)
class RatioCheck:
    """A ratio at one C against its limit (``passed`` None: C is below
    ``min_classes``, where the limit is not set)."""
    num_classes: int
    target: str
    value: float
    limit: float
    passed: Optional[bool]
    min_classes: int


def figure(record: BenchmarkRecord, name: str) -> Optional[float]:
    """The ``name`` figure (:data:`STEP`, ...) of a row that ran."""
    measured = record.measured
    if name == STEP:
        return measured.step_s
    if name == PEAK:
        return measured.peak_mb
    if name == GEMMS:
        return measured.gemm_s
    if name == SHARD_FP32:
        return record.shard_fp32_mb()
    raise ValueError(f'unknown figure {name!r}')


def _picked(records: Iterable[BenchmarkRecord], pick: RowPick,
            classes: int) -> List[BenchmarkRecord]:
    return [rec for rec in records
            if rec.row.num_classes == classes and pick.matches(rec.row)]


def _compact_ratios(pfc: RowPick) -> List[Ratio]:
    """Each compact storage's PFC0.1 peak against its fp32 shard, and its
    step against the fp32 PFC0.1 step."""
    ratios = []
    for storage in COMPACT_STORAGES:
        pick = RowPick(pfc.sample_rate, storage)
        name = row_label('PFC0.1', *storage)
        suffix = '_'.join(SHORT_NAMES[dtype] for dtype in storage)
        ratios += [
            Ratio(f'shard_{suffix}', Operand(pick, PEAK),
                  Operand(pick, SHARD_FP32),
                  f'{name} peak / shard fp32 weight'),
            Ratio(f'time_{suffix}', Operand(pick, STEP), Operand(pfc, STEP),
                  f'{name} step / PFC0.1 step')]
    return ratios


def _margin_ratios(pfc: RowPick) -> List[Ratio]:
    """Each margin's PFC0.1 step and peak against ArcFace's; sub-center
    ArcFace (K per identity) against ArcFace over as many rows, the PFC0.1
    row of K x C identities."""
    ratios = []
    for margin in RATIO_MARGINS:
        pick = RowPick(pfc.sample_rate, margin=margin)
        name = row_label('PFC0.1', margin_label=LABELS[margin])
        ratios += [
            Ratio(f'time_{margin}', Operand(pick, STEP), Operand(pfc, STEP),
                  f'{name} step / PFC0.1 step'),
            Ratio(f'memory_{margin}', Operand(pick, PEAK),
                  Operand(pfc, PEAK), f'{name} peak / PFC0.1 peak')]
    subcenters = RowPick(pfc.sample_rate, margin=ANY_SUBCENTERS)
    return ratios + [
        Ratio('time_subcenter', Operand(subcenters, STEP),
              Operand(pfc, STEP, at_subcenter_multiple=True),
              'PFC0.1 SubCenter{k} step / PFC0.1 step at {k} x C'),
        Ratio('memory_subcenter', Operand(subcenters, PEAK),
              Operand(pfc, PEAK, at_subcenter_multiple=True),
              'PFC0.1 SubCenter{k} peak / PFC0.1 peak at {k} x C')]


def build_ratios() -> Tuple[Ratio, ...]:
    """Every ratio :func:`ratio_checks` knows: Partial FC at sample rate 0.1
    against model parallel, its compact storages against the fp32 shard's
    bytes and the fp32 PFC0.1 step, and its margins against ArcFace."""
    mp, pfc = RowPick(1.0), RowPick(0.1)
    return (
        Ratio('time', Operand(pfc, STEP), Operand(mp, STEP),
              'PFC0.1 step / MP step'),
        Ratio('memory', Operand(pfc, PEAK), Operand(mp, PEAK),
              'PFC0.1 peak / MP peak'),
        Ratio('shard', Operand(pfc, PEAK), Operand(mp, SHARD_FP32),
              'PFC0.1 peak / shard fp32 weight'),
        Ratio('gemm', Operand(mp, STEP), Operand(mp, GEMMS),
              'MP step / its 3 GEMMs alone'),
        *_compact_ratios(pfc), *_margin_ratios(pfc))


RATIOS: Tuple[Ratio, ...] = build_ratios()


def ratio_checks(records: Sequence[BenchmarkRecord],
                 limits: Dict[str, float],
                 min_classes: int = 0) -> List[RatioCheck]:
    """The :data:`RATIOS` named in ``limits`` at every C whose head-only
    rows they need, each against ``limits[key]``; a ratio whose rows are
    missing is left out; C below ``min_classes`` gets the ratios without a
    verdict (``passed=None``)."""
    by_key = {ratio.key: ratio for ratio in RATIOS}
    unknown = sorted(set(limits) - set(by_key))
    if unknown:
        raise ValueError(f'unknown ratio keys {unknown}; expected some of '
                         f'{sorted(by_key)}')
    ran = [rec for rec in records if rec.ok and rec.row.head_only]
    checks = []
    for classes in sorted({rec.row.num_classes for rec in ran}):
        for key, limit in limits.items():
            found = by_key[key].evaluate(ran, classes)
            if found is None:
                continue
            value, target = found
            passed = value <= limit if classes >= min_classes else None
            checks.append(RatioCheck(
                num_classes=classes, target=target, value=value,
                limit=limit, passed=passed, min_classes=min_classes))
    return checks


def verdict(check: RatioCheck) -> str:
    if check.passed is None:
        return f'- (set for >= {check.min_classes:,})'
    return 'PASS' if check.passed else 'FAIL'
