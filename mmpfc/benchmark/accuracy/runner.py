"""Methods x seeds of the accuracy benchmark, one launch of W ranks a seed.

Example (what ``tools/benchmark_accuracy.py`` runs by default)::

    from mmpfc.benchmark.accuracy import AccuracyConfig, run_accuracy
    runs = run_accuracy(AccuracyConfig(methods='dp,mp,pfc0.1,pfc0.3'))

Each seed is one launch (:func:`mmpfc.benchmark.launcher.launch`) whose
ranks train all methods in turn from the same start; the seed sets the
identity universe, the held-out pairs, the initialization, the batches and
the sampling, so the methods of one seed are compared on equal terms.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

from mmpfc.utils.spawn import threads_per_rank

from .. import launcher
from .methods import MethodLike, MethodSpec, parse_methods
from .rows import AccuracyRecord, AccuracyRow, SeedResult

#: margins of ``CombinedMarginLoss`` by name: (m1, m2, m3)
MARGINS = dict(arcface=(1.0, 0.5, 0.0), cosface=(1.0, 0.0, 0.35))


@dataclass
class AccuracyConfig:
    """What to run; see ``tools/benchmark_accuracy.py --help``.

    ``batch_size`` is per rank. ``margin`` is ``arcface`` (m2) or
    ``cosface`` (m3) with the value ``margin_value`` (None: 0.5 / 0.35) and
    the scale ``scale``; ``data`` overrides arguments of
    :class:`~.data.SyntheticIdentityDataset`.
    """
    methods: Union[str, Sequence[MethodLike]] = (
        'dp,mp,pfc0.1,pfc0.3,'
        'pfc0.1:center_dtype=bfloat16:label=PFC0.1 bf16,'
        'pfc0.1:center_dtype=bfloat16:optim.center_state_dtype=int8:'
        'label=PFC0.1 bf16/int8')
    seeds: Sequence[int] = (0, 1, 2)
    num_classes: int = 3000
    eval_identities: int = 1000
    num_pairs: int = 6000
    steps: int = 1000
    warmup_steps: int = 50
    batch_size: int = 32
    embedding_size: int = 128
    lr: float = 0.02
    weight_decay: float = 5e-4
    margin: str = 'cosface'
    margin_value: Optional[float] = 0.2
    scale: float = 16.0
    probe_batches: int = 4
    world_size: int = 2
    threads: Optional[int] = None
    timeout: float = 1800.0
    data: dict = field(default_factory=dict)

    def method_specs(self) -> List[MethodSpec]:
        return parse_methods(self.methods)

    def loss_config(self) -> dict:
        """The ``CombinedMarginLoss`` config of ``margin``."""
        if self.margin not in MARGINS:
            raise ValueError(f'margin {self.margin!r}: expected one of '
                             f'{sorted(MARGINS)}')
        m1, m2, m3 = MARGINS[self.margin]
        if self.margin_value is not None:
            m2, m3 = (self.margin_value, 0.0) if self.margin == 'arcface' \
                else (0.0, self.margin_value)
        return dict(type='CombinedMarginLoss', s=self.scale, m1=m1, m2=m2,
                    m3=m3)

    def resolved_threads(self) -> int:
        """Torch threads per rank: the option, else cores / ranks."""
        return threads_per_rank(self.world_size, self.threads)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ('num_classes', 'eval_identities', 'num_pairs', 'steps',
                     'batch_size', 'embedding_size', 'world_size'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive integer, got '
                                 f'{value!r}')
        if self.num_classes < self.world_size:
            raise ValueError(f'num_classes={self.num_classes} must be >= '
                             f'world_size={self.world_size}')
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f'warmup_steps={self.warmup_steps} must lie in '
                             f'[0, steps={self.steps})')
        if self.num_pairs < 20 or self.num_pairs % 2:
            raise ValueError(f'num_pairs must be an even number >= 20 (10 '
                             f'folds, half same), got {self.num_pairs!r}')
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f'seeds must be distinct and at least one, got '
                             f'{list(self.seeds)}')
        self.loss_config()
        self._validate_data()

    def _validate_data(self) -> None:
        """``data`` must hold dataset arguments (not the sizes set here)
        for 32x32 images, what LeNet-5 takes."""
        import inspect

        from .data import SyntheticIdentityDataset
        known = set(inspect.signature(
            SyntheticIdentityDataset.__init__).parameters) - {
                'self', 'num_classes', 'num_samples', 'identity_offset',
                'seed'}
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise ValueError(f'data options {unknown}: expected some of '
                             f'{sorted(known)}')
        if self.data.get('image_size', 32) != 32:
            raise ValueError(f"data image_size={self.data['image_size']}: "
                             'the benchmark model (LeNet-5) takes 32x32')
        SyntheticIdentityDataset(num_classes=self.num_classes, **self.data)


def make_row(cfg: AccuracyConfig, seed: int,
             methods: Sequence[MethodSpec]) -> AccuracyRow:
    """What one launch's ranks get (see :mod:`.worker`)."""
    return AccuracyRow(
        seed=int(seed), methods=tuple(methods), data=dict(cfg.data),
        num_classes=cfg.num_classes, eval_identities=cfg.eval_identities,
        num_pairs=cfg.num_pairs, steps=cfg.steps,
        warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size,
        embedding_size=cfg.embedding_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, loss=cfg.loss_config(),
        probe_batches=cfg.probe_batches, threads=cfg.resolved_threads())


def check_methods(cfg: AccuracyConfig,
                  methods: Sequence[MethodSpec]) -> None:
    """Build every method's head and optim wrapper once, here, so a bad
    kwarg fails before any launch, naming the method."""
    import torch
    from mmengine.optim import build_optim_wrapper

    import mmpfc  # noqa: F401
    from mmpfc.registry import MODELS

    from .worker import model_config, optim_wrapper_config
    row = make_row(cfg, cfg.seeds[0], methods)
    for method in row.methods:
        try:
            head = MODELS.build(model_config(row, method)['head'])
            build_optim_wrapper(torch.nn.ModuleDict(dict(head=head)),
                                optim_wrapper_config(row, method))
        except Exception as err:
            raise ValueError(
                f'method {method.label!r} (head {method.head}, optim '
                f'wrapper kwargs {method.optim_wrapper}) cannot be '
                f'built: {type(err).__name__}: {err}') from err


def launch_seed(row: AccuracyRow, world_size: int,
                timeout: float) -> List[SeedResult]:
    """One seed on ``world_size`` fresh ranks running :func:`.worker.run_rank`
    (the project's launcher); results in rank order."""
    from .worker import run_rank
    return launcher.launch(run_rank, row, world_size, timeout)


def seed_records(seed: int, methods: Sequence[MethodSpec],
                 ranks: Sequence[SeedResult],
                 launch_s: float) -> List[AccuracyRecord]:
    """One record per method of a seed: rank 0's figures (it verified),
    every rank's training time."""
    records = []
    for i, result in enumerate(ranks[0].methods):
        verification = result.verification
        records.append(AccuracyRecord(
            label=result.label, train_loss=result.train_loss,
            full_loss=result.full_loss, first_loss=result.first_loss,
            loss_curve=result.loss_curve, train_s=result.train_s,
            accuracy=verification.accuracy,
            fold_std=verification.fold_std,
            threshold=verification.threshold, eval_s=result.eval_s,
            seed=int(seed), name=methods[i].name, head=methods[i].head,
            optim_wrapper=methods[i].optim_wrapper, launch_s=launch_s,
            train_s_ranks=[r.methods[i].train_s for r in ranks],
            run_s=result.train_s + result.eval_s))
    return records


def run_accuracy(cfg: AccuracyConfig,
                 log: Callable[[str], None] = print
                 ) -> List[AccuracyRecord]:
    """Run every seed; one record per (seed, method), in run order."""
    cfg.validate()
    methods = cfg.method_specs()
    check_methods(cfg, methods)
    records = []
    for seed in cfg.seeds:
        start = time.perf_counter()
        ranks = launch_seed(make_row(cfg, seed, methods), cfg.world_size,
                            cfg.timeout)
        wall = time.perf_counter() - start
        for record in seed_records(seed, methods, ranks, wall):
            records.append(record)
            log(f'seed {seed} {record.label}: accuracy '
                f'{100 * record.accuracy:.2f} %, loss '
                f'{record.train_loss:.3f} (all centers '
                f'{record.full_loss:.3f}), {record.run_s:.0f} s')
    return records
