"""What the accuracy benchmark runs and measures, one typed record per stage.

An :class:`AccuracyRow` is one seed's launch (it crosses process
boundaries); each rank answers with a :class:`SeedResult`, one
:class:`MethodResult` per method; rank 0's, with the launch's timings,
become one :class:`AccuracyRecord` per (seed, method), what
``accuracy.json`` keeps under ``runs``. :class:`AccuracySummary` and
:class:`PairedDifference` are the table's rows and the checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from .methods import MethodSpec


@dataclass(frozen=True)
class AccuracyRow:
    """One seed: the methods its ranks train in turn and the sizes, data
    and schedule they share (``loss``: the ``CombinedMarginLoss``
    config)."""
    seed: int
    methods: Tuple[MethodSpec, ...]
    data: Dict[str, Any]
    num_classes: int
    eval_identities: int
    num_pairs: int
    steps: int
    warmup_steps: int
    batch_size: int
    embedding_size: int
    lr: float
    weight_decay: float
    loss: Dict[str, Any]
    probe_batches: int
    threads: int


@dataclass(frozen=True)
class Verification:
    """The 10-fold protocol's result on the held-out pairs."""
    accuracy: float
    fold_std: float
    threshold: float


@dataclass(frozen=True)
class MethodResult:
    """One method trained on one rank: its losses (``loss_curve``: the
    mean of each tenth of the steps) and, on rank 0, its verification."""
    label: str
    train_loss: float
    full_loss: float
    first_loss: float
    loss_curve: List[float]
    train_s: float
    verification: Optional[Verification] = None
    eval_s: Optional[float] = None


@dataclass(frozen=True)
class SeedResult:
    """What one rank returns of a seed."""
    rank: int
    data_s: float
    methods: List[MethodResult]


@dataclass(frozen=True)
class AccuracyRecord:
    """One method of one seed, as ``accuracy.json`` keeps it."""
    label: str
    train_loss: float
    full_loss: float
    first_loss: float
    loss_curve: List[float]
    train_s: float
    accuracy: float
    fold_std: float
    threshold: float
    eval_s: float
    seed: int
    name: str
    head: Dict[str, Any]
    optim_wrapper: Dict[str, Any]
    launch_s: float
    train_s_ranks: List[float]
    run_s: float


@dataclass(frozen=True)
class AccuracySummary:
    """One method over its seeds: means and sample stds (accuracy as a
    fraction, seconds per run)."""
    label: str
    seeds: List[int]
    accuracy: float
    accuracy_std: float
    train_loss: float
    train_loss_std: float
    full_loss: float
    full_loss_std: float
    run_s: float
    run_s_std: float


@dataclass(frozen=True)
class PairedDifference:
    """``accuracy(label) - accuracy(reference)`` in points, per seed both
    ran and their mean; passed when its size is at most ``tolerance``."""
    label: str
    reference: str
    seeds: List[int]
    difference_points: float
    difference_std: float
    per_seed: List[float]
    tolerance: float
    passed: bool
