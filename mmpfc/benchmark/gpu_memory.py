"""GPU memory per rank of a config, from this project's own figures.

The memory model (:mod:`.memory_model`) counts tensors from sizes. What it
needs of a model, the replicated parameters and the activations autograd
saves per image, is measured here on a virtual GPU
(:mod:`mmpfc.testing.virtual_gpu`): the real model under CUDA fp16
autocast, on fake CUDA tensors, on any machine. A CPU forward cannot stand
in for it: CPU autocast (bf16) keeps other dtypes (IResNet-50 saves 63 MiB
per image under CPU autocast, about 34 MiB under CUDA fp16 autocast).

What a GPU holds beyond the tensors is added as explicit allowances
(:data:`GPU_ALLOWANCES`), each with its source; what none of this sees
(kernels' internal buffers, fragmentation beyond the allowance, DDP's
communication buckets in flight) is listed in docs/benchmark.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from .memory_model import FP32, MemoryEstimate, predict_memory

MiB = 2**20
#: The input images of face configs: 3 x 112 x 112.
FACE_IMAGE = (3, 112, 112)


@dataclass(frozen=True)
class Activations:
    """Bytes autograd keeps for backward: ``per_sample`` per image, and
    ``fixed`` whatever the batch (autocast's fp16 copies of the weights,
    saved by the layers that use them)."""
    per_sample: float
    fixed: int

    def bytes_for(self, batch_size: int) -> int:
        return int(self.per_sample * batch_size) + self.fixed


@dataclass(frozen=True)
class ModelFigures:
    """What the memory model needs of a config's model (no head)."""
    params: int  # replicated parameters (elements)
    largest_param: int  # elements of the largest of them
    activations: Activations
    image_shape: Tuple[int, ...] = FACE_IMAGE


@dataclass(frozen=True)
class Allowance:
    """Memory a GPU process holds beyond its tensors."""
    nbytes: int
    source: str


#: Per GPU, beyond the tensors (``torch.cuda.max_memory_allocated`` does
#: not count these; ``nvidia-smi`` / ``gpustat`` do).
GPU_ALLOWANCES: Dict[str, Allowance] = {
    'cuda_context': Allowance(
        512 * MiB,
        'the CUDA context with the kernels of torch, cuBLAS, cuDNN and '
        'NCCL loaded: 0.3-1 GB per process by CUDA version and GPU '
        '(CUDA Programming Guide, "Lazy Loading": modules load on first '
        'use since CUDA 11.7); 512 MiB assumed'),
    'cublas_workspace': Allowance(
        32 * MiB,
        "cuBLAS workspaces, one per handle and stream: PyTorch's default "
        'CUBLAS_WORKSPACE_CONFIG allots 4 MiB x 2 + 16 KiB x 8 before '
        'Hopper and 32 MiB on Hopper (PyTorch docs, "Reproducibility" '
        'and CUDA semantics notes); the larger one is assumed'),
    'cudnn_workspace': Allowance(
        256 * MiB,
        'cuDNN convolution workspace: cudnn.benchmark picks the fastest '
        'algorithm whose workspace fits the free memory; for 112x112 '
        'IResNet convolutions at batch 128 the workspaces of the chosen '
        'algorithms are tens to a few hundred MB (an estimate: the '
        'virtual step runs no cuDNN)'),
    'nccl_buffers': Allowance(
        192 * MiB,
        'NCCL communication buffers: NCCL_BUFFSIZE (default 4 MiB, NCCL '
        'docs, "Environment Variables") per channel and per peer '
        'direction, a few to 32 channels on 8 GPUs; only with more than '
        'one rank'),
}
#: The caching allocator rounds blocks (to 512 B, large ones to 2 MiB),
#: splits and caches them: reserved memory exceeds the live tensors' by a
#: fraction of them (PyTorch CUDA semantics notes, "Memory management";
#: ``max_memory_reserved`` vs ``max_memory_allocated``). Assumed 10 %.
ALLOCATOR_OVERHEAD = 0.10


def cuda_activations(model_cfg: dict,
                     image_shape: Sequence[int] = FACE_IMAGE,
                     amp_dtype: Optional[torch.dtype] = torch.float16,
                     batches: Tuple[int, int] = (2, 4)) -> Activations:
    """What the backbone (and neck) of ``model_cfg`` saves for backward
    under CUDA autocast, measured on a virtual GPU at two batch sizes: the
    difference per image is ``per_sample``, the rest ``fixed``."""
    from mmpfc.testing import virtual_rank
    from mmpfc.testing.virtual_step import build_on_virtual_gpu
    saved = []
    with virtual_rank(0, 1):
        model = build_on_virtual_gpu(dict(model_cfg, head=None))
        model.train()
        state = {t.untyped_storage()._cdata
                 for t in [*model.parameters(), *model.buffers()]}
        for batch in batches:
            saved.append(_saved_bytes(model, batch, image_shape, amp_dtype,
                                      state))
    (small, low), (large, high) = zip(batches, saved)
    per_sample = (high - low) / (large - small)
    return Activations(per_sample=per_sample,
                       fixed=max(0, int(round(low - per_sample * small))))


def _saved_bytes(model, batch: int, image_shape: Sequence[int],
                 amp_dtype: Optional[torch.dtype], skip: set) -> int:
    """Distinct CUDA storages saved for backward by one forward, without
    the model's own parameters and buffers."""
    seen: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if tensor.device.type == 'cuda' and storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return tensor

    inputs = torch.empty(batch, *image_shape, device='cuda')
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast('cuda', dtype=amp_dtype or torch.float16,
                           enabled=amp_dtype is not None):
        model.extract_feat(inputs)
    return sum(seen.values())


def model_figures(model_cfg: dict, image_shape: Sequence[int] = FACE_IMAGE,
                  amp: bool = True) -> ModelFigures:
    """Parameters and CUDA activations of ``model_cfg`` without its head."""
    from mmpfc.testing import virtual_rank
    from mmpfc.testing.virtual_step import build_on_virtual_gpu
    with virtual_rank(0, 1):
        model = build_on_virtual_gpu(dict(model_cfg, head=None))
        sizes = [p.numel() for p in model.parameters()]
    return ModelFigures(
        params=sum(sizes), largest_param=max(sizes, default=0),
        activations=cuda_activations(
            model_cfg, image_shape, torch.float16 if amp else None),
        image_shape=tuple(image_shape))


def with_gpu_allowances(estimate: MemoryEstimate,
                        world_size: int) -> MemoryEstimate:
    """``estimate`` (tensors, as :func:`.memory_model.predict_memory`
    gives them, its CPU ``runtime`` slack replaced) plus what a GPU process
    holds beyond its tensors."""
    parts = {k: v for k, v in estimate.parts.items() if k != 'runtime'}
    tensors = sum(parts.values())
    parts['allocator'] = int(ALLOCATOR_OVERHEAD * tensors)
    for name, allowance in GPU_ALLOWANCES.items():
        if name == 'nccl_buffers' and world_size == 1:
            continue
        parts[name] = allowance.nbytes
    return MemoryEstimate(peak=int(sum(parts.values())), parts=parts)


def predict_gpu_memory(figures: ModelFigures, batch_size: int,
                       world_size: int, backbone_states: int = 1,
                       **head) -> MemoryEstimate:
    """Predicted peak per GPU: the memory model's tensors for ``head``
    (:func:`.memory_model.predict_memory` kwargs) and the model's figures,
    plus :data:`GPU_ALLOWANCES` and the allocator's overhead. The peak is
    where the backward begins: all activations saved, the backbone's
    gradients not yet made (but the first)."""
    tensors = predict_memory(
        world_size=world_size, batch_size=batch_size,
        backbone_params=figures.params, largest_param=figures.largest_param,
        activation_bytes=figures.activations.per_sample,
        activation_fixed=figures.activations.fixed,
        backbone_states=backbone_states, backbone_grads_at_peak=False,
        input_bytes=FP32 * _elements(figures.image_shape), **head)
    return with_gpu_allowances(tensors, world_size)


def _elements(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def describe_allowances() -> str:
    """One line per allowance: name, MiB and source (for docs and tools)."""
    return '\n'.join(f'- {name}: {a.nbytes / MiB:.0f} MiB. {a.source}.'
                     for name, a in GPU_ALLOWANCES.items())


#: Parts of :func:`.memory_model.predict_memory` that live from one step
#: to the next (the shard and its optimizer state).
RESIDENT_PARTS = ('centers', 'momentum', 'exp_avg', 'exp_avg_sq',
                  'row_step')


def live_between_steps(estimate: MemoryEstimate, figures: ModelFigures,
                       backbone_states: int = 1) -> int:
    """Bytes live after an optimizer step (gradients set to None): the
    resident parts of ``estimate`` and the replicated parameters with
    their optimizer states."""
    parts = estimate.parts
    return (sum(parts.get(k, 0) for k in RESIDENT_PARTS)
            + (1 + backbone_states) * figures.params * FP32)


def live_after_forward(estimate: MemoryEstimate, figures: ModelFigures,
                       world_size: int, batch_size: int,
                       embedding_size: int,
                       backbone_states: int = 1) -> int:
    """Bytes live when the forward ends: those between steps, the saved
    activations, the head's logit buffer, the normalized input batch and
    the gathered embeddings of the global batch (fp32)."""
    parts = estimate.parts
    gathered = world_size * batch_size * embedding_size * FP32
    return (live_between_steps(estimate, figures, backbone_states)
            + parts['activations'] + parts['logits_and_grad']
            + parts['inputs'] + gathered)
