"""One rank of one benchmark row: build, run warm-up and timed steps, measure.

A row is a plain dict (it crosses process boundaries)::

    dict(method='pfc', label='PFC0.1', sample_rate=0.1, num_classes=10**6,
         batch_size=128, embedding_size=512, backbone=None, amp=False,
         steps=5, warmup=2, threads=1, seed=0, gemm=True,
         center_dtype='float32', state_dtype='float32')

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
storage existed. Likewise a margin (:mod:`.margins`): ``loss`` (the head's
margin config) and ``num_subcenters`` are passed on only when the row has
them, so an ArcFace row builds the head's default; ``embedding_norms``
(``(low, high)``) rescales the head-only embeddings to norms drawn
uniformly in that range, for the margins that read the norms.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .meter import MemoryMeter, PhaseTimer

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


def build_head(row: dict) -> torch.nn.Module:
    """The row's head, with only the options that differ from the
    defaults (an fp32 ArcFace row builds the head it always did)."""
    from mmpfc.registry import MODELS
    common = dict(_scope_='mmpfc', num_classes=row['num_classes'],
                  in_channels=row['embedding_size'], seed=row['seed'])
    if row['method'] == 'dp':
        return MODELS.build(dict(type='MarginSoftmaxHead', **common))
    options = {}
    if row.get('center_dtype', 'float32') != 'float32':
        options['center_dtype'] = row['center_dtype']
    if row.get('loss') is not None:
        options['loss'] = dict(row['loss'])
    if row.get('num_subcenters', 1) != 1:
        from .margins import SUBCENTERS_MISSING, subcenters_available
        if not subcenters_available():
            raise RuntimeError(SUBCENTERS_MISSING)
        options['num_subcenters'] = row['num_subcenters']
    return MODELS.build(dict(type='PartialFCHead',
                             sample_rate=row['sample_rate'], **common,
                             **options))


#: Added to a rank's seed for the norms of :func:`head_embeddings`: their
#: directions stay those of the plain rows.
NORM_SEED_OFFSET = 7777


def head_embeddings(row: dict, rank: int,
                    gen: torch.Generator) -> torch.Tensor:
    """The (B, D) random embeddings of a head-only row.

    Standard normal rows (norms close to ``sqrt(D)``); with
    ``embedding_norms=(low, high)`` each is rescaled to a norm drawn
    uniformly in that range from a generator of its own, so the directions
    (and ``gen``'s later draws, the labels) are those of the plain row.
    """
    emb = torch.randn(row['batch_size'], row['embedding_size'],
                      generator=gen)
    norms = row.get('embedding_norms')
    if norms is not None:
        low, high = norms
        norm_gen = torch.Generator().manual_seed(
            row['seed'] + 1000 * rank + NORM_SEED_OFFSET)
        target = torch.empty(emb.shape[0]).uniform_(low, high,
                                                    generator=norm_gen)
        emb = emb * (target / torch.linalg.vector_norm(emb, dim=1))[:, None]
    return emb


def build_optim_wrapper(params, row: dict, clip: bool):
    from mmpfc.engine.optimizers import (PartialFCAmpOptimWrapper,
                                         PartialFCOptimWrapper)
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9,
                                weight_decay=5e-4)
    kwargs = dict(clip_grad=dict(max_norm=5.0)) if clip else {}
    if row.get('state_dtype', 'float32') != 'float32':
        kwargs['center_state_dtype'] = row['state_dtype']
    if row['amp']:
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


def run_rank(rank: int, world_size: int, row: dict) -> dict:
    """Run ``row`` on this rank (process group already initialized)."""
    import mmpfc  # noqa: F401  (registers the models)
    from mmpfc.registry import MODELS
    torch.set_num_threads(row['threads'])
    cuda = row['device'] == 'cuda'
    device = torch.device('cuda', torch.cuda.current_device()) if cuda \
        else torch.device('cpu')
    gen = torch.Generator().manual_seed(row['seed'] + 1000 * rank)
    batch, dim = row['batch_size'], row['embedding_size']
    meter = MemoryMeter(device)
    meter.start()

    backbone = None
    cfg = backbone_config(row.get('backbone'), dim)
    if cfg is not None:
        backbone = MODELS.build(cfg).to(device)
        if world_size > 1:
            backbone = torch.nn.parallel.DistributedDataParallel(
                backbone, device_ids=[device.index] if cuda else None,
                broadcast_buffers=False)
        inputs = torch.randn(batch, *IMAGE_SHAPE, generator=gen).to(device)
    else:
        inputs = head_embeddings(row, rank, gen).to(device)
    head = build_head(row).to(device)
    params = list(head.parameters())
    if backbone is not None:
        params += list(backbone.parameters())
    wrapper = build_optim_wrapper(params, row, clip=backbone is not None)
    scaler = getattr(wrapper, 'loss_scaler', None)
    amp_dtype = torch.float16 if cuda else torch.bfloat16

    timer = PhaseTimer(device, meter)
    losses = []
    for _ in range(row['warmup'] + row['steps']):
        labels = torch.randint(0, row['num_classes'], (batch, ),
                               generator=gen).to(device)
        timer.phase('backbone_forward')
        if backbone is not None:
            with torch.autocast(device.type, dtype=amp_dtype,
                                enabled=row['amp']):
                feats = backbone(inputs)[0]
            emb = feats.detach().requires_grad_(True)
        else:
            emb = inputs.clone().requires_grad_(True)
        timer.phase('head')
        loss = head.loss_by_labels(emb, labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if row['method'] == 'dp' and world_size > 1:
            dist.all_reduce(head.weight.grad)
            head.weight.grad.div_(world_size)
        timer.phase('backbone_backward')
        if backbone is not None:
            feats.backward(emb.grad.to(feats.dtype))
        timer.phase('optimizer')
        wrapper.step()
        wrapper.zero_grad()
        timer.phase(None)
        losses.append(float(loss.detach()))

    skip = row['warmup']
    result = dict(
        rank=rank, device=_device_name(device),
        num_local=int(getattr(head, 'num_local', row['num_classes'])),
        rows_per_step=_rows_per_step(head, row),
        times={k: v[skip:] for k, v in timer.times.items()},
        phase_peak_mb={k: max(v[skip:]) for k, v in meter.phases.items()
                       if v[skip:]},
        peak_mb=meter.peak_mb(), steady_mb=meter.current_mb(),
        reserved_peak_mb=meter.reserved_peak_mb(),
        baseline_mb=meter.baseline / 2**20, loss=losses[-1])
    if row.get('gemm'):
        del wrapper, emb, loss
        if world_size > 1:
            dist.barrier()  # all ranks time their GEMMs together
        num = batch if row['method'] == 'dp' else batch * world_size
        weight = head.weight.detach()
        weight = weight.reshape(-1, dim) if weight.shape[-1] != dim \
            else weight  # sub-centers: (rows, K*D) -> (rows*K, D)
        result['gemm'] = time_gemms(num, result['rows_per_step'], dim, device,
                                    weight)
    return result


def _rows_per_step(head, row: dict) -> int:
    """Centers the step multiplies with (every sub-center counted)."""
    subs = int(getattr(head, 'num_subcenters', 1))
    if row['method'] == 'dp' or row['sample_rate'] >= 1.0:
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
