"""Per-rank memory of a training step, predicted from the sizes alone.

Symbols: C identities, W ranks, D embedding size, B per-rank batch,
N = W * B global batch, ``Cl = ceil(C / W)`` centers of the largest shard,
``S`` centers used per step (``max(int(p * Cl), positives)`` with sample
rate ``p``; ``Cl`` for model parallel). Gradients and logits are fp32
(4 bytes) whatever the storage. The sharded centers take ``c`` bytes per
element (``center_dtype``: 4 for float32, 2 for bfloat16 / float16) and
one optimizer state of the shard takes ``state(Cl)`` bytes
(``state_dtype``): ``4 Cl D`` (float32), ``2 Cl D`` (bfloat16) or
``Cl D + 4 Cl ceil(D / 64)`` (int8: one byte per element plus an fp32
absmax scale per block of 64 elements of a row). SGD with momentum keeps
one state, Adam two (``exp_avg``, ``exp_avg_sq``) plus a float64 update
count per row (``8 Cl``); ``momentum=False`` (plain SGD) keeps none. Peak
bytes per rank of the head:

* Partial FC (``p < 1``):
  ``c Cl D + states`` (the whole shard and its optimizer state)
  ``+ S max(N, D) 4`` (one buffer: the (S, N) logits, then in place the
  (S, D) gradient of the sampled centers, kept until the optimizer step)
  ``+ Cl 4 + 12 S`` (sampling scores and top-k).
* Model parallel (``p = 1``): the buffer covers the whole shard,
  ``c Cl D + states + Cl max(N, D) 4``. With fp32 centers and state it
  becomes ``weight.grad`` and ``torch.optim.SGD`` adds a temporary of the
  shard for the weight decay (``+ Cl D 4``); with compact storage the
  shard is updated row by row from the buffer, in chunks, and there is no
  such temporary.
* Data parallel (every rank holds all C centers, plain autograd, local
  batch B, fp32 only): centers, momentum, the normalized copy, its
  gradient, ``F.normalize``'s backward temporary and the gradient,
  ``6 C D 4``, plus ``4 B C 4`` for the cosines, the margin logits, the
  softmax and its gradient.

A margin that changes the non-target logits too (CurricularFace;
``non_target_margin=True``) keeps the slope of every non-target logit from
forward to backward: ``S N 4`` bytes more (a quarter of the logit buffer at
N = 256, D = 512; 1.2 % of the PFC0.1 peak at 1M identities on 2 ranks).
The other margins (ArcFace, AdaFace, MagFace, ElasticFace) keep per-row
values only (N), nothing of the head's size: they add no term.

Sub-centers (``num_subcenters=K``, sub-center ArcFace) widen every row of
the shard to ``K D`` values (centers, state, the weight-decay temporary of
model parallel) and the buffer to ``S max(N, K D) 4``; sampling is of
classes, as for K = 1, and a uint8 (S, N) map keeps which sub-center gave
each class cosine (``S N`` bytes).

Compact storage changes only the centers and their state: the fused step
upcasts the rows it uses chunk by chunk, and those chunks, like the int8
states' dequantized chunks, are left to ``RUNTIME_SLACK``. Adam is
modelled where the centers are updated row by row (Partial FC, or model
parallel with compact storage); the temporaries of a dense
``torch.optim.Adam`` step are not.

Plus, for every method, the embeddings of the global batch and their
gradients (``4 N D 4``), the chunk temporaries and what the allocator keeps
(``RUNTIME_SLACK``). With a backbone: parameters, gradients, momentum and
the DDP gradient buckets (``4 P 4`` for P parameters), the largest
parameter once more (weight-decay temporary), the input batch and the
activations saved for backward (``B x`` a per-sample figure measured with
:func:`activation_bytes_per_sample`).

On the CPU the Partial FC head keeps its logit/gradient buffer from one
step to the next (``PartialFCHead(reuse_buffer=None)``): the peak is the
same, and with a backbone the buffer is counted beside the activations.
On CUDA the fused head also keeps a bit mask of the clamped cosines,
``S N / 8`` bytes (5 MB at the reference's 3M identities on 8 GPUs), left
to ``RUNTIME_SLACK``.

The model counts tensors, not the CUDA context (~0.3-0.5 GB per GPU, shown
by ``nvidia-smi`` but not by ``torch.cuda.max_memory_allocated``) nor the
cache of the CUDA allocator. :func:`max_num_classes` inverts it: the most
identities a configuration can hold within a per-rank budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

FP32 = 4
#: Allocator slack and chunk temporaries, measured on the CPU (glibc).
RUNTIME_SLACK = 48 * 2**20


@dataclass
class MemoryEstimate:
    """Predicted peak bytes per rank and the parts it is made of."""
    peak: int
    parts: Dict[str, int] = field(default_factory=dict)

    @property
    def peak_gb(self) -> float:
        return self.peak / 2**30

    def fits(self, budget_bytes: Optional[float]) -> bool:
        return budget_bytes is None or self.peak <= budget_bytes


def shard_rows(num_classes: int, world_size: int) -> int:
    """Centers of the largest shard, ``ceil(C / W)``."""
    return -(-num_classes // world_size)


def sampled_rows(num_classes: int, world_size: int, sample_rate: float,
                 batch_size: int) -> int:
    """Centers one rank uses per step (expected value for random labels)."""
    local = shard_rows(num_classes, world_size)
    if sample_rate >= 1.0:
        return local
    # distinct local classes among N uniform labels
    num = world_size * batch_size
    positives = local * (1.0 - math.exp(-num / max(1, num_classes)))
    return max(int(sample_rate * local), math.ceil(positives))


#: Bytes per element of the sharded centers, by ``center_dtype``.
CENTER_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}
#: Optimizer-state dtypes of the sharded centers (``center_state_dtype``).
STATE_DTYPES = ('float32', 'bfloat16', 'int8')
#: Elements of a row that share one fp32 scale in the int8 state.
INT8_BLOCK = 64
OPTIMIZERS = ('sgd', 'adam')


def check_dtypes(center_dtype: str = 'float32',
                 state_dtype: str = 'float32') -> None:
    """Refuse a storage name the head or the optim wrapper does not take,
    so a typo fails before anything is built or predicted."""
    if center_dtype not in CENTER_BYTES:
        raise ValueError(f'center_dtype must be one of {list(CENTER_BYTES)}, '
                         f'got {center_dtype!r}')
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f'state_dtype must be one of {list(STATE_DTYPES)}, '
                         f'got {state_dtype!r}')


def state_bytes(rows: int, dim: int, state_dtype: str = 'float32') -> int:
    """Bytes of one optimizer state of ``rows`` centers of ``dim`` elements
    (int8: one byte per element and an fp32 scale per row block)."""
    check_dtypes(state_dtype=state_dtype)
    if state_dtype == 'int8':
        return rows * dim + rows * -(-dim // INT8_BLOCK) * FP32
    return rows * dim * (FP32 if state_dtype == 'float32' else 2)


def head_memory(method: str, num_classes: int, world_size: int,
                embedding_size: int = 512, batch_size: int = 128,
                sample_rate: float = 1.0, momentum: bool = True,
                weight_decay: bool = True, center_dtype: str = 'float32',
                state_dtype: str = 'float32',
                optimizer: str = 'sgd', non_target_margin: bool = False,
                num_subcenters: int = 1) -> Dict[str, int]:
    """The head's parts of the peak (bytes per rank), see the module doc.

    Args:
        method: ``'dp'`` (replicated centers) or ``'pfc'`` (sharded, with
            ``sample_rate`` 1.0 for model parallel).
        momentum: Whether SGD keeps a momentum state (Adam always keeps
            state, so ``optimizer='adam'`` requires it).
        center_dtype: Storage of the sharded centers: ``'float32'``,
            ``'bfloat16'`` or ``'float16'``.
        state_dtype: Storage of their optimizer state: ``'float32'``,
            ``'bfloat16'`` or ``'int8'`` (block-wise quantized).
        optimizer: ``'sgd'`` or ``'adam'`` (Adam / AdamW).
        non_target_margin: The margin changes non-target logits
            (``modifies_non_target``, e.g. CurricularFace): the slopes it
            keeps for backward are counted.
        num_subcenters: K, the centers per identity of the sharded head.
    """
    _check_head_options(center_dtype, state_dtype, optimizer, momentum,
                        num_subcenters)
    compact = (center_dtype, state_dtype) != ('float32', 'float32')
    if method == 'dp':
        if compact or optimizer != 'sgd' or non_target_margin or \
                num_subcenters != 1:
            raise ValueError("method 'dp' is modelled with fp32 storage, "
                             'SGD and ArcFace only; compact storage, Adam, '
                             'non-target margins and sub-centers are for '
                             "the sharded head ('pfc')")
        return _replicated_head(num_classes, embedding_size, batch_size,
                                momentum)
    if method != 'pfc':
        raise ValueError(f"method must be 'dp' or 'pfc', got {method!r}")
    return _sharded_head(num_classes, world_size, embedding_size, batch_size,
                         sample_rate, momentum, weight_decay, center_dtype,
                         state_dtype, optimizer, non_target_margin,
                         num_subcenters)


def _check_head_options(center_dtype: str, state_dtype: str, optimizer: str,
                        momentum: bool, num_subcenters: int) -> None:
    """Refuse a storage, optimizer or sub-center count the head cannot
    have, naming it."""
    check_dtypes(center_dtype, state_dtype)
    if not isinstance(num_subcenters, int) or num_subcenters < 1:
        raise ValueError(f'num_subcenters must be an int >= 1, got '
                         f'{num_subcenters!r}')
    if optimizer not in OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {list(OPTIMIZERS)}, got '
                         f'{optimizer!r}')
    if optimizer == 'adam' and not momentum:
        raise ValueError("optimizer='adam' always keeps state: momentum=False "
                         'means plain SGD')


def _replicated_head(num_classes: int, embedding_size: int, batch_size: int,
                     momentum: bool) -> Dict[str, int]:
    """Data parallel: every rank holds all C centers (fp32, SGD)."""
    centers = num_classes * embedding_size * FP32
    return dict(centers=centers, momentum=centers * momentum,
                center_grads=4 * centers,
                logits=4 * batch_size * num_classes * FP32,
                embeddings=4 * batch_size * embedding_size * FP32)


def _sharded_head(num_classes: int, world_size: int, embedding_size: int,
                  batch_size: int, sample_rate: float, momentum: bool,
                  weight_decay: bool, center_dtype: str, state_dtype: str,
                  optimizer: str, non_target_margin: bool,
                  num_subcenters: int) -> Dict[str, int]:
    """Model parallel and Partial FC: a shard of the centers, its states
    and the buffer of the rows a step uses."""
    dim, num = embedding_size, world_size * batch_size
    dense = sample_rate >= 1.0 and (center_dtype, state_dtype) == (
        'float32', 'float32')
    if dense and optimizer == 'adam':
        raise ValueError('model parallel with fp32 storage steps the shard '
                         "with torch.optim.Adam, whose temporaries are not "
                         "modelled; use optimizer='sgd' or compact storage")
    local = shard_rows(num_classes, world_size)
    rows = sampled_rows(num_classes, world_size, sample_rate, batch_size)
    width = num_subcenters * dim  # values per row of the shard
    parts = dict(centers=local * width * CENTER_BYTES[center_dtype])
    state = state_bytes(local, width, state_dtype)
    if optimizer == 'sgd':
        parts['momentum'] = state * momentum
    else:
        parts.update(exp_avg=state, exp_avg_sq=state, row_step=8 * local)
    parts.update(logits_and_grad=rows * max(num, width) * FP32,
                 embeddings=4 * num * dim * FP32)
    if num_subcenters > 1:
        parts['subcenter_argmax'] = rows * num
    if sample_rate < 1.0:
        parts['sampling'] = local * FP32 + 12 * rows
    elif dense and weight_decay:
        parts['weight_decay_temp'] = local * width * FP32
    if non_target_margin:
        parts['non_target_slope'] = rows * num * FP32
    return parts


def predict_memory(method: str, num_classes: int, world_size: int,
                   embedding_size: int = 512, batch_size: int = 128,
                   sample_rate: float = 1.0, momentum: bool = True,
                   weight_decay: bool = True, backbone_params: int = 0,
                   largest_param: int = 0,
                   activation_bytes: float = 0.0,
                   input_bytes: int = 0, center_dtype: str = 'float32',
                   state_dtype: str = 'float32',
                   optimizer: str = 'sgd', non_target_margin: bool = False,
                   num_subcenters: int = 1, activation_fixed: int = 0,
                   backbone_states: int = 1,
                   backbone_grads_at_peak: bool = True) -> MemoryEstimate:
    """Predicted peak memory per rank of one training step.

    Args:
        method, num_classes, world_size, embedding_size, batch_size,
        sample_rate, momentum, weight_decay, center_dtype, state_dtype,
        optimizer, non_target_margin, num_subcenters: See
        :func:`head_memory`.
        backbone_params: Parameters of the backbone (0: head only).
        largest_param: Elements of its largest parameter.
        activation_bytes: Saved activations per sample.
        input_bytes: Bytes of one input sample.
        activation_fixed: Saved bytes whatever the batch (autocast's
            16-bit copies of the weights).
        backbone_states: fp32 optimizer states per backbone parameter
            (SGD with momentum 1, Adam(W) 2, plain SGD 0).
        backbone_grads_at_peak: Whether the backbone's gradients are live
            at the peak. On a GPU the peak is where the backward begins:
            every activation is saved, and of the gradients (set to None
            by the last step) only the first one, of the embedding layer
            (the largest parameter), exists yet.
    """
    parts = head_memory(method, num_classes, world_size, embedding_size,
                        batch_size, sample_rate, momentum, weight_decay,
                        center_dtype, state_dtype, optimizer,
                        non_target_margin, num_subcenters)
    if backbone_params:
        # parameters, gradients, DDP's buckets, optimizer states, and the
        # weight-decay temporary (or first gradient) of the largest one
        copies = 2 + backbone_states + int(backbone_grads_at_peak)
        parts['backbone'] = (copies * backbone_params + largest_param) * FP32
        parts['activations'] = int(activation_bytes * batch_size) + \
            activation_fixed
        parts['inputs'] = input_bytes * batch_size
    parts['runtime'] = RUNTIME_SLACK
    return MemoryEstimate(peak=int(sum(parts.values())), parts=parts)


def max_num_classes(budget_bytes: float, method: str, world_size: int,
                    **kwargs) -> int:
    """The most identities whose predicted peak per rank fits the budget.

    What a given memory allows is the question behind a "does not fit"
    row and behind the identities-per-GPU table. ``kwargs`` are those of
    :func:`predict_memory`; 0 when not even one identity fits. The peak
    grows with C, so a binary search finds the C that fits while C + 1
    does not (to within the few bytes by which the expected count of
    sampled rows can shrink when C grows by one).
    """
    if not math.isfinite(budget_bytes):
        raise ValueError(f'budget must be finite, got {budget_bytes}')
    return largest_fitting(lambda classes: predict_memory(
        method, classes, world_size, **kwargs).peak <= budget_bytes)


def largest_fitting(fits: Callable[[int], bool]) -> int:
    """The largest count ``n >= 1`` with ``fits(n)``, for a ``fits`` that
    holds up to some count and fails beyond it (memory grows with the
    count); 0 when ``fits(1)`` fails. Doubling, then bisection."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:  # fits(low) and not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def activation_bytes_per_sample(backbone: torch.nn.Module,
                                input_shape=(3, 112, 112),
                                amp_dtype: Optional[torch.dtype] = None,
                                batch: int = 2) -> float:
    """Bytes autograd saves for backward per sample, measured on the CPU.

    Runs one training-mode forward of ``batch`` random inputs and sums the
    distinct storages that autograd keeps (``saved_tensors_hooks``).
    """
    seen: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = backbone.training
    backbone.train()
    inputs = torch.randn(batch, *input_shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast('cpu', dtype=amp_dtype or torch.bfloat16,
                           enabled=amp_dtype is not None):
        backbone(inputs)
    backbone.train(was_training)
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / batch
