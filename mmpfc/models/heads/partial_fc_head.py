"""The sharded, sampled classification layer (Partial FC), an mmpretrain
head."""
from __future__ import annotations

import logging
import weakref
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from mmengine.logging import print_log

from mmpfc.registry import MODELS
from mmpfc.utils.arg_checks import Bool, Int, Opt, Parsed, Real, arg_specs

from ..utils import (active_ddp, all_gather_with_grad,
                     distributed_cross_entropy, get_rank_and_world_size,
                     mark_sharded, refuse_replicating_ddp, shard_range)
from ..utils.distributed import all_gather_no_grad
from ..utils.low_precision import (RoundingNoise, check_representable,
                                   dtype_name, is_compact, parse_center_dtype,
                                   parse_center_rounding, stochastic_round)
from ..utils.workspace import Workspace
from .base_margin_head import BaseMarginHead, build_margin_loss
from .center_sampler import CenterSampler
from .fused_margin_softmax import (MAX_SUBCENTERS, fused_margin_softmax,
                                   supports_fused)
from .sampled_gradients import SampledGradients, SampledRows

__all__ = ['PartialFCHead', 'build_margin_loss']

#: Added to the base seed of the stochastic-rounding stream of rank r.
ROUNDING_SEED_OFFSET = 0x5EED_0F_B16


@MODELS.register_module()
@arg_specs(sample_rate=Real(0.0, 1.0), reuse_buffer=Opt(Bool()),
           check_batch_size=Opt(Bool()),
           center_dtype=Parsed(parse_center_dtype, wrong=['int8', 1]),
           center_rounding=Parsed(parse_center_rounding, wrong=['up']),
           num_subcenters=Int(1, MAX_SUBCENTERS))
class PartialFCHead(BaseMarginHead):
    """Margin softmax over class centers sharded across ranks (Partial FC).

    Every rank owns the contiguous classes ``[class_start, class_start +
    num_local)`` as ``weight`` (rows in class order). Each step all-gathers the
    embeddings and labels of the global batch, computes cosine logits against
    its shard (``sample_rate=1.0``: model parallel) or against the sampled rows
    (``0 <= sample_rate < 1``: Partial FC, every positive kept), applies the
    margin and a softmax cross-entropy whose normalizer is reduced over ranks.

    Gradient convention: after ``loss(...)['loss'].backward()``, the gradient
    of ``feats`` is ``world_size * dL/dfeats`` for the global mean loss ``L``;
    DDP's averaging of the backbone gradients over ranks cancels the factor.

    Sampled centers (``sample_rate < 1``) are not updated through
    ``weight.grad``: backward leaves the gradient of the sampled rows in a
    record of the step; ``PartialFCOptimWrapper`` then applies the
    optimizer's rule (SGD, Adam or AdamW, with its current hyper-parameters)
    to those rows only, and keeps the state of the whole shard (momentum,
    moments) in the optimizer state of ``weight``. Unsampled rows and their
    state are left untouched, and the step costs memory proportional to the
    sampled rows.

    With a :class:`~mmpfc.models.losses.BaseMargin` (``CombinedMarginLoss``,
    ``CurricularFaceLoss``, ``AdaFaceLoss``, ``MagFaceLoss``,
    ``ElasticFaceLoss``; docs/margins.md) the logits, margin and
    cross-entropy run fused (:mod:`.fused_margin_softmax`): no normalized
    copy of the centers, one (S, N) buffer for logits and gradients, sampled
    rows gathered in chunks. A margin that overrides ``forward``, or any
    other module, gets the plain composition.

    Compact centers (``center_dtype='bfloat16'`` or ``'float16'``) halve the
    shard: rows are upcast to fp32 chunk by chunk for the logits, the
    gradient of the used rows is kept in fp32 (every row in model parallel,
    which then takes the optimizer wrapper's row path too), and the update,
    computed in fp32, is written back with stochastic rounding
    (:mod:`mmpfc.models.utils.low_precision`) from a per-rank stream saved
    in checkpoints.

    Sub-centers (``num_subcenters=K > 1``, sub-center ArcFace, Deng et al.,
    ECCV 2020): each class has K centers, its cosine is the largest of
    their K cosines, the margin applies to that class cosine and only the
    closest sub-center gets the gradient. A class's K sub-centers are kept
    side by side in its row, ``weight`` of shape (num_local, K*D), so that
    sharding, sampling (of classes, all K kept), the row-wise optimizer
    rules, compact storage and checkpoints (rows by class id) are those of
    K = 1; ``weight.view(num_local, K, D)`` lists them. ``predict`` and the
    embeddings are unchanged (D wide).

    Example::

        head=dict(type='mmpfc.PartialFCHead', num_classes=93431,
                  in_channels=512, sample_rate=0.1,
                  loss=dict(type='CombinedMarginLoss', s=64.0, m2=0.5))

    Args:
        num_classes: Total identities C over all ranks.
        in_channels: Embedding size D.
        sample_rate: Fraction of each shard used per step, in [0, 1].
        loss: Config of the margin (a ``BaseMargin``, docs/margins.md).
        init_std: Std of the normal initialization of the centers.
        seed: Base seed of the center sampler; rank r uses ``seed + r``.
            Defaults to ``torch.initial_seed()`` at construction.
        reuse_buffer: Keep the fused (S, max(N, D)) logit/gradient buffer
            from step to step (:mod:`mmpfc.models.utils.workspace`).
            None: on the CPU only, where every fresh buffer is page-faulted
            by the kernel; CUDA's caching allocator already recycles it, and
            freeing it there leaves the memory to the backbone's next
            forward.
        check_batch_size: All-gather the batch sizes every step and raise if
            they differ (an all-gather of unequal batches fails or hangs).
            None: on the CPU only, where it costs a small gloo message; on
            GPUs the runner's start-up check of the train dataloader
            (``check_train_data``: drop_last or an infinite sampler) is the
            guarantee, and a per-step check would stall every step on a
            device read.
        center_dtype: Storage dtype of the shard: ``'float32'`` (default),
            ``'bfloat16'`` or ``'float16'`` (range +-65504: loading
            larger values raises).
        center_rounding: How a 16-bit shard's updates are written back:
            ``'stochastic'`` (default) or ``'nearest'`` (most small
            updates are lost; for comparison only).
        num_subcenters: K, the centers per class, an int in [1, 255];
            1 (default) is the plain head.
        init_cfg: MMEngine init config (unused by the shard itself).

    Host-device synchronization: on CUDA a step of the fused head reads
    nothing from the device when the sample budget exceeds the global batch
    (``int(sample_rate * num_local) > N``, always the case at scale). The
    label range check is then read one step late
    (:class:`.label_check.LabelRangeCheck`).
    """

    def __init__(self,
                 num_classes: int,
                 in_channels: int,
                 sample_rate: float = 1.0,
                 loss: dict = dict(type='CombinedMarginLoss', s=64.0, m1=1.0,
                                   m2=0.5, m3=0.0),
                 init_std: float = 0.01,
                 seed: Optional[int] = None,
                 reuse_buffer: Optional[bool] = None,
                 check_batch_size: Optional[bool] = None,
                 center_dtype: Union[str, torch.dtype] = 'float32',
                 center_rounding: str = 'stochastic',
                 num_subcenters: int = 1,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(num_classes, in_channels, loss, init_cfg=init_cfg)
        self.rank, self.world_size = get_rank_and_world_size()
        self.sample_rate = sample_rate
        self.class_start, self.num_local = shard_range(
            num_classes, self.rank, self.world_size)

        # Rank-dependent init so shards are not copies of each other.
        base_seed = torch.initial_seed() if seed is None else seed
        storage = parse_center_dtype(center_dtype)
        self.center_rounding = center_rounding
        self.num_subcenters = num_subcenters
        # one row per class, its K sub-centers side by side
        self.weight = self.init_centers(
            self.num_local, num_subcenters * in_channels, init_std,
            base_seed + 7919 * (self.class_start + 1), storage)
        mark_sharded(self.weight, owner=self)
        # the stochastic rounding of a 16-bit shard: a stream per rank
        self.rounding = RoundingNoise(
            (base_seed + ROUNDING_SEED_OFFSET + self.rank) % (2**63),
            name='stochastic rounding') if is_compact(storage) else None
        self.sampler = CenterSampler(self.num_local, sample_rate,
                                     seed=(base_seed + self.rank) % (2**63))
        self.reuse_buffer = reuse_buffer
        self.check_batch_size = check_batch_size
        self.workspace = Workspace()  # used when reuse_buffer says so
        # (rows, holder of .grad) of the steps since the last optimizer update
        self._sampled = SampledGradients()
        self._row_updates_expected = False  # see expect_row_updates
        # the DDP checked last (a weak reference: an id could be reused
        # by a later DDP once this one is gone)
        self._checked_ddp: Optional[weakref.ref] = None

    def _load_from_state_dict(self, state_dict, prefix, *args,
                              **kwargs) -> None:
        saved = state_dict.get(prefix + 'weight')
        if torch.is_tensor(saved) and saved.dtype != self.weight.dtype:
            check_representable(saved, self.weight.dtype,
                                f'loading {prefix}weight into '
                                'center_dtype='
                                f'{dtype_name(self.weight.dtype)!r}')
            print_log(
                f'{prefix}weight: converted the saved '
                f'{dtype_name(saved.dtype)} centers to the head\'s '
                f'center_dtype {dtype_name(self.weight.dtype)} (round to '
                'nearest)', logger='current', level=logging.INFO)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict:
        # a copy checks its DDP again (a weak reference does not pickle)
        return dict(super().__getstate__(), _checked_ddp=None)

    def __setstate__(self, state: dict) -> None:
        # a copy (deepcopy, pickle) owns its own copy of the shard
        super().__setstate__(state)
        mark_sharded(self.weight, owner=self)

    @property
    def samples_centers(self) -> bool:
        """True when steps use sampled rows only."""
        return self.sample_rate < 1.0

    @property
    def row_updates(self) -> bool:
        """True when backward leaves the rows' gradient to
        :meth:`pop_sampled_gradient` (sampled rows, or a 16-bit shard whose
        fp32 gradient ``weight.grad`` could not hold) and the optim wrapper
        updates those rows itself."""
        return self.samples_centers or is_compact(self.weight.dtype)

    def round_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Updated fp32 rows in the shard's dtype: stochastically rounded
        from this rank's stream (``center_rounding='stochastic'``), or to
        nearest (``'nearest'``, to measure what the stream is for)."""
        dtype = self.weight.dtype
        if not is_compact(dtype) or self.center_rounding == 'nearest':
            return values.to(dtype)
        return stochastic_round(values, dtype, self.rounding)

    # ------------------------------------------------------------ the step
    def loss_by_labels(self, embeddings: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Loss for a (B, D) embedding batch and its (B,) class ids."""
        if self.world_size > 1:
            self._check_ddp()
        labels = self._check_inputs(embeddings, labels)
        if self._training_step():
            self._refuse_unapplied_gradients()
        embeddings = all_gather_with_grad(embeddings)
        labels = all_gather_no_grad(
            labels.to(embeddings.device, non_blocking=True))
        self._check_label_range(labels)  # the global batch: on every rank

        local = labels - self.class_start
        local = torch.where((local >= 0) & (local < self.num_local), local,
                            torch.full_like(local, -1))
        index = None
        if self.samples_centers:
            index, local = self.sampler.sample(local)
        record_index = index
        if index is None and self.row_updates:  # every row, by the record
            record_index = torch.arange(self.num_local, device=local.device)

        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = self.logit_dtype(embeddings, self.weight)
            embeddings = embeddings.to(dtype)
            if supports_fused(self.margin_loss):
                return fused_margin_softmax(embeddings, self.weight, index,
                                            local, self.margin_loss,
                                            self._record(record_index),
                                            self._workspace_for(embeddings),
                                            self.num_subcenters)
            # any other margin module: the plain composition
            weight = self.weight if record_index is None else \
                self._sampled_rows(record_index)
            cos = self._plain_cosines(embeddings, weight.to(dtype))
            logits = self.margin_loss(cos.clamp(-1.0, 1.0), local)
            return distributed_cross_entropy(logits, local)

    def _plain_cosines(self, embeddings: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
        """(N, S) class cosines of the plain composition: with sub-centers
        the largest of each class's K (max: the gradient goes to the
        arg-max sub-center only)."""
        subs = self.num_subcenters
        if subs == 1:
            return F.linear(F.normalize(embeddings, dim=1),
                            F.normalize(weight, dim=1))
        sub = F.normalize(weight.reshape(-1, self.in_channels), dim=1)
        cos = F.linear(F.normalize(embeddings, dim=1), sub)
        return cos.view(cos.shape[0], -1, subs).max(dim=2)[0]

    def _workspace_for(self, embeddings: torch.Tensor
                       ) -> Optional[Workspace]:
        reuse = self.reuse_buffer
        if reuse is None:
            reuse = embeddings.device.type == 'cpu'
        return self.workspace if reuse else None

    def _training_step(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _record(self, index: Optional[torch.Tensor]
                ) -> Optional[SampledRows]:
        """Where backward leaves the gradient of the sampled rows."""
        if index is None or not self._training_step():
            return None
        record = SampledRows(index)
        self._sampled.add(index, record)
        return record

    def _sampled_rows(self, index: torch.Tensor) -> torch.Tensor:
        """A leaf copy of the sampled rows; its gradient is kept for update."""
        rows = self.weight.detach()[index]
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        if not self._training_step():
            return rows
        rows.requires_grad_(True)
        self._sampled.add(index, rows)
        return rows

    def pop_sampled_gradient(self
                             ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Merged ``(rows, grad)`` of the sampled steps since the last update.

        With gradient accumulation several micro-steps sample different rows;
        their gradients are summed per row. Returns None when nothing was
        sampled with a gradient. Clears the record.
        """
        return self._sampled.pop(self.weight.shape[1])  # K*D per row

    def expect_row_updates(self) -> None:
        """Called by an optim wrapper that applies the rows' gradients at
        its step (the PartialFC wrappers, when they are built): from then
        on, gradients may wait for it over several steps (gradient
        accumulation)."""
        self._row_updates_expected = True

    def _refuse_unapplied_gradients(self) -> None:
        """Fail loudly before a training step while an earlier step's
        sampled gradients wait and no PartialFC optim wrapper will apply
        them: the optimizer is driven by a wrapper that does not know them,
        and the sampled centers would never learn."""
        if self._row_updates_expected or not self._sampled.pending_steps():
            return
        raise RuntimeError(
            f'{type(self).__name__} (sample_rate={self.sample_rate}, '
            f'center_dtype={dtype_name(self.weight.dtype)}): the sampled-'
            f'center gradients of {self._sampled.pending_steps()} '
            'step(s) were never applied, so the optimizer driving this '
            'head cannot update its centers: use '
            "optim_wrapper=dict(type='mmpfc.PartialFCOptimWrapper', ...) "
            "or 'mmpfc.PartialFCAmpOptimWrapper'.")

    def clear_sampled_gradient(self) -> None:
        """Forget sampled gradients (``zero_grad`` of the optim wrapper)."""
        self._sampled.clear()

    # ------------------------------------------------------------- checks
    def _check_ddp(self) -> None:
        """Refuse a DDP that replicates the rows; each DDP once (the check
        walks the wrapped model's parameters)."""
        ddp = active_ddp()
        checked = self._checked_ddp
        if ddp is not None and (checked is None or checked() is not ddp):
            refuse_replicating_ddp(ddp)
            self._checked_ddp = weakref.ref(ddp)

    def _check_inputs(self, embeddings: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        labels = self._check_shapes(embeddings, labels)
        check = self.check_batch_size
        if check is None:
            check = embeddings.device.type == 'cpu'
        if self.world_size > 1 and check:
            self._check_batch_sizes(embeddings)
        return labels

    def _check_batch_sizes(self, embeddings: torch.Tensor) -> None:
        """All ranks must contribute the same batch size to the all-gather."""
        size = torch.tensor([embeddings.shape[0]], device=embeddings.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(
                'PartialFCHead needs the same batch size on every rank, got '
                f'{sizes} (use drop_last=True or an InfiniteSampler)')

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, sample_rate={self.sample_rate}, '
                f'rank={self.rank}, class_start={self.class_start}, '
                f'num_local={self.num_local}, '
                f'center_dtype={dtype_name(self.weight.dtype)}' + (
                    f', num_subcenters={self.num_subcenters}'
                    if self.num_subcenters > 1 else ''))
