"""A training step's time on a GPU, estimated from a virtual step's work.

Each operator of the virtual step (:class:`mmpfc.testing.Work`) takes
the longer of its arithmetic at the GPU's peak for its dtype and its bytes
at the GPU's memory bandwidth (a roofline), both at a fraction of peak that
well-tuned kernels reach; the GPU runs them one after the other, and the
host must issue them (a few microseconds each): a phase takes the longer of
the two. Collectives take their bytes at NCCL's bus bandwidth; DDP's
all-reduce of the replicated gradients overlaps the backward.

What this cannot see: kernel fusion and tuning (cuDNN picks algorithms
by measuring), clocks and power limits, the data loader, stragglers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Sequence

import torch

from mmpfc.testing import Collective, Work

TERA = 1e12
GIGA = 1e9


@dataclass(frozen=True)
class GPU:
    """Peak figures of one GPU (dense, no sparsity), from its datasheet."""
    name: str
    memory: int  # bytes
    fp16: float  # tensor-core FLOP/s, fp16 / bf16 in, fp32 accumulate
    fp32: float  # FLOP/s of fp32 products (TF32 off, PyTorch's default)
    conv_fp32: float  # fp32 convolutions: cuDNN uses TF32 where it can
    bandwidth: float  # memory, bytes/s
    bus_bandwidth: float  # NCCL all-reduce bus bandwidth on 8 GPUs
    source: str


GPUS: Dict[str, GPU] = {
    'V100': GPU('Tesla V100-SXM2-32GB', 32 * 2**30, 125 * TERA,
                15.7 * TERA, 15.7 * TERA, 900 * GIGA, 130 * GIGA,
                'NVIDIA V100 datasheet; NVLink 2 bus bandwidth as '
                'nccl-tests report it on a DGX-1'),
    'A100': GPU('A100-SXM4-80GB', 80 * 2**30, 312 * TERA, 19.5 * TERA,
                156 * TERA, 2039 * GIGA, 230 * GIGA,
                'NVIDIA A100 datasheet (TF32 156 TFLOP/s); NVLink 3, '
                'nccl-tests on a DGX A100'),
    'H100': GPU('H100-SXM5-80GB', 80 * 2**30, 989 * TERA, 67 * TERA,
                495 * TERA, 3350 * GIGA, 450 * GIGA,
                'NVIDIA H100 datasheet (SXM, dense); NVLink 4, nccl-tests '
                'on a DGX H100'),
    'H200': GPU('H200-SXM-141GB', 141 * 10**9, 989 * TERA, 67 * TERA,
                495 * TERA, 4800 * GIGA, 450 * GIGA,
                'NVIDIA H200 datasheet (SXM, dense: the H100 SXM\'s '
                'arithmetic with HBM3e); NVLink 4 as the H100'),
}
#: Fractions of peak that tuned kernels reach (assumed): tensor-core and
#: fp32 products, memory-bound kernels, NCCL.
COMPUTE_EFFICIENCY = 0.6
BANDWIDTH_EFFICIENCY = 0.75
#: Host time to issue one kernel (PyTorch eager, assumed), and the latency
#: of one collective.
LAUNCH_SECONDS = 5e-6
COLLECTIVE_LATENCY = 20e-6
#: Operators that move no data a kernel would (metadata, allocation).
_FREE_OPS = {'empty', 'empty_like', 'new_empty', 'empty_strided',
             'new_empty_strided', 'detach', 'alias', 'lift_fresh',
             '_local_scalar_dense', 'set_', 'resize_'}
_CONVOLUTIONS = {'convolution', 'convolution_backward', '_convolution',
                 'cudnn_convolution'}


def gpu_by_name(name: str) -> GPU:
    """The :data:`GPUS` entry of ``name`` (case-insensitive): a key such
    as ``H100``, or a device name holding one, as
    ``torch.cuda.get_device_name()`` gives it (``NVIDIA H100 80GB HBM3``)."""
    wanted = str(name).lower()
    for key, gpu in GPUS.items():
        if key.lower() == wanted:
            return gpu
    named = [gpu for key, gpu in GPUS.items() if key.lower() in wanted]
    if len(named) == 1:
        return named[0]
    raise ValueError(f'unknown GPU {name!r}: the step-time table knows '
                     f'{", ".join(GPUS)}')


def op_seconds(work: Work, gpu: GPU) -> float:
    """The roofline time of one operator on ``gpu``."""
    if work.op in _FREE_OPS:
        return 0.0
    if work.dtype in (torch.float16, torch.bfloat16):
        peak = gpu.fp16
    elif work.op in _CONVOLUTIONS:
        peak = gpu.conv_fp32
    else:
        peak = gpu.fp32
    return max(work.flops / (peak * COMPUTE_EFFICIENCY),
               work.nbytes / (gpu.bandwidth * BANDWIDTH_EFFICIENCY))


def collective_seconds(kind: str, nbytes: int, world_size: int,
                       gpu: GPU) -> float:
    """NCCL time of one collective of ``nbytes`` per rank (ring
    algorithms: an all-reduce moves 2 (W-1)/W of its bytes, a gather or
    scatter (W-1)/W of the whole)."""
    if world_size == 1:
        return 0.0
    share = (world_size - 1) / world_size
    moved = {'all_reduce': 2 * share * nbytes,
             'all_gather': share * world_size * nbytes,
             'reduce_scatter': share * nbytes}.get(kind, nbytes)
    return COLLECTIVE_LATENCY + moved / (gpu.bus_bandwidth *
                                         BANDWIDTH_EFFICIENCY)


def phase_seconds(works: Sequence[Work], collectives: Iterable[Collective],
                  world_size: int, gpu: GPU) -> float:
    """One phase: its kernels (or the host issuing them, if longer), then
    its collectives (the head's are on the critical path)."""
    kernels = sum(op_seconds(w, gpu) for w in works)
    issue = LAUNCH_SECONDS * sum(w.op not in _FREE_OPS for w in works)
    return max(kernels, issue) + sum(
        collective_seconds(c.kind, c.nbytes, world_size, gpu)
        for c in collectives)


def step_seconds(gpu_record, world_size: int, replicated_bytes: int,
                 gpu: GPU) -> Dict[str, float]:
    """Seconds per phase of the last step of a virtual run
    (``VirtualGPU`` with ``count_work``), and ``'total'``. DDP's
    all-reduce of ``replicated_bytes`` of gradients overlaps the
    backward: that phase takes the longer of the two."""
    times = {phase: phase_seconds(gpu_record.work_in(phase),
                                  gpu_record.collectives_in(phase),
                                  world_size, gpu)
             for phase in ('forward', 'backward', 'step')}
    times['backward'] = max(times['backward'], collective_seconds(
        'all_reduce', replicated_bytes, world_size, gpu))
    times['total'] = sum(times.values())
    return times
