"""One rank of one benchmark row: build, run warm-up and timed steps, measure.

A row is a :class:`~.rows.BenchmarkRow` (it crosses process boundaries).
``method`` is ``'pfc'`` (``PartialFCHead``; sample rate 1.0 is model
parallel) or ``'dp'`` (``MarginSoftmaxHead``, every rank holds all centers
and their gradients are all-reduced). A step is: backbone forward (skipped
with ``backbone=None``: random embeddings), head forward + backward, backbone
backward (DDP all-reduce), optimizer step (``PartialFCOptimWrapper`` or, with
``amp``, ``PartialFCAmpOptimWrapper``; SGD lr 0.1, momentum 0.9, weight decay
5e-4; the backbone is clipped at norm 5 as in the reference).

``center_dtype`` (the head's ``center_dtype``) and ``state_dtype`` (the optim
wrapper's ``center_state_dtype``) are passed on only when not
``'float32'``, so an fp32 row builds exactly what it did before compact
storage existed. Likewise a margin (:mod:`..margins`): ``loss`` (the head's
margin config) and ``num_subcenters`` are passed on only when the row has
them, so an ArcFace row builds the head's default; ``embedding_norms``
(``(low, high)``) rescales the head-only embeddings to norms drawn
uniformly in that range, for the margins that read the norms.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .meter import MemoryMeter, PhaseTimer
from .rows import BenchmarkRow, RankResult

BACKBONES = {
    'r18': dict(type='IResNet', depth=18),
    'r34': dict(type='IResNet', depth=34),
    'r50': dict(type='IResNet', depth=50),
    'r100': dict(type='IResNet', depth=100),
    'r200': dict(type='IResNet', depth=200),
    'mbf': dict(type='MobileFaceNet'),
}
PHASES = ('backbone_forward', 'head', 'backbone_backward', 'optimizer')
IMAGE_SHAPE = (3, 112, 112)


def backbone_config(name: Optional[str], embedding_size: int
                    ) -> Optional[dict]:
    """Registry config of a backbone name (None or ``'none'``: none)."""
    if name in (None, 'none'):
        return None
    if name not in BACKBONES:
        raise ValueError(f'unknown backbone {name!r}; choose one of '
                         f"{['none', *BACKBONES]}")
    return dict(BACKBONES[name], _scope_='mmpfc',
                embedding_size=embedding_size)


def build_head(row: BenchmarkRow) -> torch.nn.Module:
    """The row's head, with only the options that differ from the
    defaults (an fp32 ArcFace row builds the head it always did)."""
    from mmpfc.registry import MODELS
    common = dict(_scope_='mmpfc', num_classes=row.num_classes,
                  in_channels=row.embedding_size, seed=row.seed)
    if row.method == 'dp':
        return MODELS.build(dict(type='MarginSoftmaxHead', **common))
    options = {}
    if row.center_dtype != 'float32':
        options['center_dtype'] = row.center_dtype
    if row.loss is not None:
        options['loss'] = dict(row.loss)
    if row.num_subcenters != 1:
        from ..margins import SUBCENTERS_MISSING, subcenters_available
        if not subcenters_available():
            raise RuntimeError(SUBCENTERS_MISSING)
        options['num_subcenters'] = row.num_subcenters
    return MODELS.build(dict(type='PartialFCHead',
                             sample_rate=row.sample_rate, **common,
                             **options))


#: Added to a rank's seed for the norms of :func:`head_embeddings`: their
#: directions stay those of the plain rows.
NORM_SEED_OFFSET = 7777


def head_embeddings(row: BenchmarkRow, rank: int,
                    gen: torch.Generator) -> torch.Tensor:
    """The (B, D) random embeddings of a head-only row.

    Standard normal rows (norms close to ``sqrt(D)``); with
    ``embedding_norms=(low, high)`` each is rescaled to a norm drawn
    uniformly in that range from a generator of its own, so the directions
    (and ``gen``'s later draws, the labels) are those of the plain row.
    """
    emb = torch.randn(row.batch_size, row.embedding_size, generator=gen)
    if row.embedding_norms is not None:
        low, high = row.embedding_norms
        norm_gen = torch.Generator().manual_seed(
            row.seed + 1000 * rank + NORM_SEED_OFFSET)
        target = torch.empty(emb.shape[0]).uniform_(low, high,
                                                    generator=norm_gen)
        emb = emb * (target / torch.linalg.vector_norm(emb, dim=1))[:, None]
    return emb


def build_optim_wrapper(params, row: BenchmarkRow, clip: bool):
    from mmpfc.engine.optimizers import (PartialFCAmpOptimWrapper,
                                         PartialFCOptimWrapper)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                weight_decay=5e-4)
    kwargs = dict(clip_grad=dict(max_norm=5.0)) if clip else {}
    if row.state_dtype != 'float32':
        kwargs['center_state_dtype'] = row.state_dtype
    if row.amp:
        return PartialFCAmpOptimWrapper(optimizer=optimizer,
                                        loss_scale='dynamic', **kwargs)
    return PartialFCOptimWrapper(optimizer=optimizer, **kwargs)


def time_gemms(num: int, rows: int, dim: int, device: torch.device,
               weight: Optional[torch.Tensor] = None,
               reps: int = 2) -> Dict[str, float]:
    """Seconds of the head's three GEMMs alone (best of ``reps``).

    ``(N, D) x (D, S)`` forward, ``(N, S) x (S, D)`` for the embedding
    gradient, ``(S, N) x (N, D)`` for the center gradient: the arithmetic
    the head cannot avoid.
    """
    emb = torch.randn(num, dim, device=device)
    if weight is None or weight.shape != (rows, dim) \
            or weight.dtype != emb.dtype:  # compact centers: time fp32
        weight = torch.randn(rows, dim, device=device)
    grad = torch.randn(num, rows, device=device)
    cases = dict(forward=lambda: torch.mm(emb, weight.t()),
                 grad_embedding=lambda: torch.mm(grad, weight),
                 grad_centers=lambda: torch.mm(grad.t(), emb))
    timer = PhaseTimer(device)
    best = {}
    for name, fn in cases.items():
        for _ in range(reps):
            timer.phase(name)
            fn()
        timer.phase(None)
        best[name] = min(timer.times[name])
    return best


@dataclass
class TrainingStep:
    """What one rank trains: the backbone (None: head only, ``inputs`` are
    then the embeddings), the head and their optim wrapper."""
    row: BenchmarkRow
    world_size: int
    device: torch.device
    backbone: Optional[torch.nn.Module]
    inputs: torch.Tensor
    head: torch.nn.Module
    wrapper: object

    def run(self, labels: torch.Tensor, timer: PhaseTimer) -> float:
        """One step, phase by phase; its loss."""
        row, device = self.row, self.device
        scaler = getattr(self.wrapper, 'loss_scaler', None)
        timer.phase('backbone_forward')
        if self.backbone is not None:
            amp_dtype = torch.float16 if device.type == 'cuda' \
                else torch.bfloat16
            with torch.autocast(device.type, dtype=amp_dtype,
                                enabled=row.amp):
                feats = self.backbone(self.inputs)[0]
            emb = feats.detach().requires_grad_(True)
        else:
            emb = self.inputs.clone().requires_grad_(True)
        timer.phase('head')
        loss = self.head.loss_by_labels(emb, labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if row.method == 'dp' and self.world_size > 1:
            dist.all_reduce(self.head.weight.grad)
            self.head.weight.grad.div_(self.world_size)
        timer.phase('backbone_backward')
        if self.backbone is not None:
            feats.backward(emb.grad.to(feats.dtype))
        timer.phase('optimizer')
        self.wrapper.step()
        self.wrapper.zero_grad()
        timer.phase(None)
        return float(loss.detach())


def build_training_step(row: BenchmarkRow, rank: int, world_size: int,
                        device: torch.device,
                        gen: torch.Generator) -> TrainingStep:
    """The row's backbone (under DDP on several ranks) and inputs, or the
    head-only embeddings, its head and the optim wrapper of both."""
    from mmpfc.registry import MODELS
    backbone = None
    cfg = backbone_config(row.backbone, row.embedding_size)
    if cfg is not None:
        backbone = MODELS.build(cfg).to(device)
        if world_size > 1:
            backbone = torch.nn.parallel.DistributedDataParallel(
                backbone,
                device_ids=[device.index] if device.type == 'cuda' else None,
                broadcast_buffers=False)
        inputs = torch.randn(row.batch_size, *IMAGE_SHAPE,
                             generator=gen).to(device)
    else:
        inputs = head_embeddings(row, rank, gen).to(device)
    head = build_head(row).to(device)
    params = list(head.parameters())
    if backbone is not None:
        params += list(backbone.parameters())
    wrapper = build_optim_wrapper(params, row, clip=backbone is not None)
    return TrainingStep(row, world_size, device, backbone, inputs, head,
                        wrapper)


def rank_device(row: BenchmarkRow) -> torch.device:
    """This rank's GPU (the spawner set it current), or the CPU."""
    if row.device == 'cuda':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def run_rank(rank: int, world_size: int, row: BenchmarkRow) -> RankResult:
    """Run ``row`` on this rank (process group already initialized)."""
    import mmpfc  # noqa: F401  (registers the models)
    torch.set_num_threads(row.threads)
    device = rank_device(row)
    gen = torch.Generator().manual_seed(row.seed + 1000 * rank)
    meter = MemoryMeter(device)
    meter.start()
    step = build_training_step(row, rank, world_size, device, gen)
    timer = PhaseTimer(device, meter)
    losses: List[float] = []
    for _ in range(row.warmup + row.steps):
        labels = torch.randint(0, row.num_classes, (row.batch_size, ),
                               generator=gen).to(device)
        losses.append(step.run(labels, timer))
    result = _rank_result(rank, row, step.head, timer, meter, losses[-1])
    if not row.gemm:
        return result
    head = step.head
    del step  # the optimizer state goes before the GEMMs are timed
    if world_size > 1:
        dist.barrier()  # all ranks time their GEMMs together
    return replace(result, gemm=_time_head_gemms(head, row, world_size,
                                                 result.rows_per_step,
                                                 device))


def _rank_result(rank: int, row: BenchmarkRow, head: torch.nn.Module,
                 timer: PhaseTimer, meter: MemoryMeter,
                 loss: float) -> RankResult:
    """The timed steps' figures (the warm-up steps left out)."""
    skip = row.warmup
    return RankResult(
        rank=rank, device=_device_name(meter.device),
        num_local=int(getattr(head, 'num_local', row.num_classes)),
        rows_per_step=rows_per_step(head, row),
        times={k: v[skip:] for k, v in timer.times.items()},
        phase_peak_mb={k: max(v[skip:]) for k, v in meter.phases.items()
                       if v[skip:]},
        peak_mb=meter.peak_mb(), steady_mb=meter.current_mb(),
        reserved_peak_mb=meter.reserved_peak_mb(),
        baseline_mb=meter.baseline / 2**20, loss=loss)


def _time_head_gemms(head: torch.nn.Module, row: BenchmarkRow,
                     world_size: int, rows: int,
                     device: torch.device) -> Dict[str, float]:
    """:func:`time_gemms` at the step's sizes: the global batch (the local
    one for DP) against the centers the step used."""
    dim = row.embedding_size
    num = row.batch_size if row.method == 'dp' \
        else row.batch_size * world_size
    weight = head.weight.detach()
    weight = weight.reshape(-1, dim) if weight.shape[-1] != dim \
        else weight  # sub-centers: (rows, K*D) -> (rows*K, D)
    return time_gemms(num, rows, dim, device, weight)


def rows_per_step(head, row: BenchmarkRow) -> int:
    """Centers the step multiplies with (every sub-center counted)."""
    subs = int(getattr(head, 'num_subcenters', 1))
    if row.method == 'dp' or row.sample_rate >= 1.0:
        return int(head.weight.shape[0]) * subs
    return int(head.sampler.num_sample) * subs


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return 'cpu'
