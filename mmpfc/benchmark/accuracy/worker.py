"""One rank of one seed: train every method in turn, then evaluate it.

A launch (one seed) gets an :class:`~.rows.AccuracyRow` (it crosses process
boundaries; :func:`mmpfc.benchmark.accuracy.runner.make_row` writes it) and
runs its methods one after the other in the same processes, each from the
same initial state: the same backbone initialization, the same batches
(per rank), the same held-out pairs. A method is trained with the
project's own parts, as the Runner's train loop would run them:
``FaceRecognizer`` (LeNet-5, a linear + BN neck, the method's head) under
``PartialFCDistributedDataParallel``, ``PartialFCOptimWrapper`` (SGD) with
MMEngine's warm-up and poly schedulers, and ``model.train_step`` per batch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .methods import MethodSpec
from .rows import AccuracyRow, MethodResult, SeedResult, Verification


def model_config(row: AccuracyRow, method: MethodSpec) -> dict:
    """``FaceRecognizer`` config of ``method`` (1x32x32 grey inputs)."""
    head = dict(method.head, num_classes=row.num_classes,
                in_channels=row.embedding_size, seed=row.seed,
                loss=dict(row.loss))
    return dict(
        type='FaceRecognizer',
        data_preprocessor=dict(mean=[127.5], std=[127.5]),
        backbone=dict(type='mmpretrain.LeNet5'),
        neck=dict(type='mmpretrain.LinearNeck', in_channels=120,
                  out_channels=row.embedding_size, gap_dim=2),
        head=head)


def optim_wrapper_config(row: AccuracyRow, method: MethodSpec) -> dict:
    """``PartialFCOptimWrapper`` config: SGD, the backbone clipped at 5."""
    return dict(type='mmpfc.PartialFCOptimWrapper',
                optimizer=dict(type='SGD', lr=row.lr, momentum=0.9,
                               weight_decay=row.weight_decay),
                **method.optim_wrapper)


def _generator(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of ints."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key) + 1) % 2**63
    return torch.Generator().manual_seed(seed)


def _batch(images: torch.Tensor, labels: torch.Tensor) -> dict:
    """A batch as MMEngine's default collate gives it to ``train_step``."""
    from mmpretrain.structures import DataSample
    return dict(inputs=images,
                data_samples=[DataSample().set_gt_label(int(label))
                              for label in labels])


@contextmanager
def all_centers(head) -> Iterator[None]:
    """Within: a sampling head computes its loss over all of its centers."""
    if not getattr(head, 'samples_centers', False):
        yield
        return
    rate = head.sample_rate
    head.sample_rate = 1.0
    try:
        yield
    finally:
        head.sample_rate = rate


def _replicated(head) -> bool:
    """True for a head whose centers every rank holds (data parallel): its
    loss is the rank's own batch's, a sharded head's the global batch's."""
    from mmpfc.models.utils import is_sharded
    return not is_sharded(head.weight)


def _mean_over_ranks(value: float, world_size: int) -> float:
    """``value`` averaged over the ranks."""
    if world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / world_size


@torch.no_grad()
def full_softmax_loss(model, probes: List[dict], world_size: int) -> float:
    """Margin-softmax loss over all centers on fixed training batches
    (comparable across methods, unlike a sampled head's training loss)."""
    model.eval()
    losses = []
    with all_centers(model.head):
        for batch in probes:
            data = model.data_preprocessor(dict(batch), False)
            losses.append(float(model(**data, mode='loss')['loss']))
    model.train()
    value = float(np.mean(losses))
    if _replicated(model.head):  # its loss is its own batch's: average it
        return _mean_over_ranks(value, world_size)
    return value


@torch.no_grad()
def verify(model, pairs, batch_size: int = 500) -> Verification:
    """The 10-fold protocol on ``pairs``: flip-summed raw embeddings, then
    L2-normalized (``embed_batch``), then ``evaluate_pairs``."""
    from mmpfc.apis import embed_batch
    from mmpfc.evaluation import evaluate_pairs
    model.eval()
    images = pairs.images.permute(0, 2, 3, 1).numpy()  # N x H x W x 1
    emb = np.concatenate([
        embed_batch(model, images[i:i + batch_size], flip=True,
                    normalize=True, input_size=None)
        for i in range(0, len(images), batch_size)])
    model.train()
    result = evaluate_pairs(emb[0::2], emb[1::2], pairs.issame.numpy())
    return Verification(accuracy=result['accuracy'],
                        fold_std=result['accuracy_std'],
                        threshold=result['threshold'])


def _train(world_size: int, row: AccuracyRow, method: MethodSpec,
           batches: List[tuple]) -> Tuple[torch.nn.Module, List[float]]:
    """``method`` trained from the seed's initial state on ``batches``:
    the model and its loss per step."""
    from mmengine.optim import LinearLR, PolyLR, build_optim_wrapper

    from mmpfc.registry import MODEL_WRAPPERS, MODELS
    torch.manual_seed(row.seed)  # the same backbone for every method
    model = MODELS.build(model_config(row, method))
    wrapped = model
    if world_size > 1:
        wrapped = MODEL_WRAPPERS.build(dict(
            type='PartialFCDistributedDataParallel', module=model,
            broadcast_buffers=False))
    optim_wrapper = build_optim_wrapper(wrapped,
                                        optim_wrapper_config(row, method))
    schedulers = [
        LinearLR(optim_wrapper, start_factor=0.1, by_epoch=False, begin=0,
                 end=row.warmup_steps),
        PolyLR(optim_wrapper, power=2.0, eta_min=0.0, by_epoch=False,
               begin=row.warmup_steps, end=row.steps)]
    losses = []
    for images, labels in batches:
        log_vars = wrapped.train_step(_batch(images, labels), optim_wrapper)
        for scheduler in schedulers:
            scheduler.step()
        losses.append(float(log_vars['loss'].detach()))
    return model, losses


def train_method(rank: int, world_size: int, row: AccuracyRow,
                 method: MethodSpec, batches: List[tuple],
                 probes: List[tuple], pairs) -> MethodResult:
    """Train ``method`` from the seed's initial state on ``batches``
    (``(images, labels)`` per step); its losses, and its accuracy on rank
    0 (which holds the ``pairs``)."""
    start = time.perf_counter()
    model, losses = _train(world_size, row, method, batches)
    train_s = time.perf_counter() - start

    tail = max(1, row.steps // 10)
    train_loss = float(np.mean(losses[-tail:]))
    if _replicated(model.head):
        train_loss = _mean_over_ranks(train_loss, world_size)
    full_loss = full_softmax_loss(
        model, [_batch(*probe) for probe in probes], world_size)
    verification = eval_s = None
    if rank == 0:
        start = time.perf_counter()
        verification = verify(model, pairs)
        eval_s = time.perf_counter() - start
    if world_size > 1:
        dist.barrier()
    return MethodResult(
        label=method.label, train_loss=train_loss, full_loss=full_loss,
        first_loss=float(np.mean(losses[:tail])),
        loss_curve=[float(np.mean(losses[i:i + tail]))
                    for i in range(0, row.steps, tail)],
        train_s=train_s, verification=verification, eval_s=eval_s)


def run_rank(rank: int, world_size: int, row: AccuracyRow) -> SeedResult:
    """Run every method of ``row`` (process group already initialized)."""
    import mmpfc  # noqa: F401  (registers the models)

    from .data import SyntheticIdentityDataset, build_pairs, held_out
    torch.set_num_threads(row.threads)
    train_set = SyntheticIdentityDataset(
        num_classes=row.num_classes, seed=row.seed, **row.data)
    start = time.perf_counter()
    # every method trains on the same batches: render them once
    gen = _generator(row.seed, rank, 1)
    batches = [train_set.sample_batch(row.batch_size, gen)
               for _ in range(row.steps)]
    gen = _generator(row.seed, rank, 2)
    probes = [train_set.sample_batch(row.batch_size, gen)
              for _ in range(row.probe_batches)]
    pairs = None
    if rank == 0:
        pairs = build_pairs(held_out(train_set, row.eval_identities),
                            row.num_pairs, seed=row.seed)
    data_s = time.perf_counter() - start
    return SeedResult(rank=rank, data_s=data_s, methods=[
        train_method(rank, world_size, row, method, batches, probes, pairs)
        for method in row.methods])
