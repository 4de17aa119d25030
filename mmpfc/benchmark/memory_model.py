"""Per-rank memory of a training step, predicted from the sizes alone.

Symbols: C identities, W ranks, D embedding size, B per-rank batch,
N = W * B global batch, ``Cl = ceil(C / W)`` centers of the largest shard,
``S`` centers used per step (``max(int(p * Cl), positives)`` with sample
rate ``p``; ``Cl`` for model parallel), fp32 (4-byte) centers, gradients,
momentum and logits. Peak bytes per rank of the head:

* Partial FC (``p < 1``):
  ``2 Cl D 4`` (centers + their SGD momentum, the whole shard)
  ``+ S max(N, D) 4`` (one buffer: the (S, N) logits, then in place the
  (S, D) gradient of the sampled centers, kept until the optimizer step)
  ``+ Cl 4 + 12 S`` (sampling scores and top-k).
* Model parallel (``p = 1``): the buffer covers the whole shard and becomes
  ``weight.grad``; ``torch.optim.SGD`` adds a temporary of the shard for
  the weight decay: ``2 Cl D 4 + Cl max(N, D) 4 + Cl D 4``.
* Data parallel (every rank holds all C centers, plain autograd, local
  batch B): centers, momentum, the normalized copy, its gradient,
  ``F.normalize``'s backward temporary and the gradient, ``6 C D 4``, plus
  ``4 B C 4`` for the cosines, the margin logits, the softmax and its
  gradient.

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
cache of the CUDA allocator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

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


def head_memory(method: str, num_classes: int, world_size: int,
                embedding_size: int = 512, batch_size: int = 128,
                sample_rate: float = 1.0, momentum: bool = True,
                weight_decay: bool = True) -> Dict[str, int]:
    """The head's parts of the peak (bytes per rank), see the module doc.

    Args:
        method: ``'dp'`` (replicated centers) or ``'pfc'`` (sharded, with
            ``sample_rate`` 1.0 for model parallel).
    """
    dim, num = embedding_size, world_size * batch_size
    if method == 'dp':
        centers = num_classes * dim * FP32
        return dict(centers=centers, momentum=centers * momentum,
                    center_grads=4 * centers,
                    logits=4 * batch_size * num_classes * FP32,
                    embeddings=4 * batch_size * dim * FP32)
    if method != 'pfc':
        raise ValueError(f"method must be 'dp' or 'pfc', got {method!r}")
    local = shard_rows(num_classes, world_size)
    rows = sampled_rows(num_classes, world_size, sample_rate, batch_size)
    centers = local * dim * FP32
    parts = dict(centers=centers, momentum=centers * momentum,
                 logits_and_grad=rows * max(num, dim) * FP32,
                 embeddings=4 * num * dim * FP32)
    if sample_rate < 1.0:
        parts['sampling'] = local * FP32 + 12 * rows
    elif weight_decay:
        parts['weight_decay_temp'] = centers
    return parts


def predict_memory(method: str, num_classes: int, world_size: int,
                   embedding_size: int = 512, batch_size: int = 128,
                   sample_rate: float = 1.0, momentum: bool = True,
                   weight_decay: bool = True, backbone_params: int = 0,
                   largest_param: int = 0,
                   activation_bytes: float = 0.0,
                   input_bytes: int = 0) -> MemoryEstimate:
    """Predicted peak memory per rank of one training step.

    Args:
        method, num_classes, world_size, embedding_size, batch_size,
        sample_rate, momentum, weight_decay: See :func:`head_memory`.
        backbone_params: Parameters of the backbone (0: head only).
        largest_param: Elements of its largest parameter.
        activation_bytes: Saved activations per sample.
        input_bytes: Bytes of one input sample.
    """
    parts = head_memory(method, num_classes, world_size, embedding_size,
                        batch_size, sample_rate, momentum, weight_decay)
    if backbone_params:
        parts['backbone'] = 4 * backbone_params * FP32 + largest_param * FP32
        parts['activations'] = int(activation_bytes * batch_size)
        parts['inputs'] = input_bytes * batch_size
    parts['runtime'] = RUNTIME_SLACK
    return MemoryEstimate(peak=int(sum(parts.values())), parts=parts)


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
