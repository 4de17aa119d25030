"""Virtual GPU ranks: rank r of W on CUDA tensors, on a machine without one.

Why: mmpfc is written for NCCL training on GPUs, and the code only a GPU
takes (CUDA fp16 autocast, the loss scaler's CUDA path, pinned copies, the
label check's events) would otherwise run nowhere but on a GPU. Here a
step runs on fake tensors (``torch._subclasses.fake_tensor``): they carry
shape, dtype and device, no data, so a 3M-identity head of 8 ranks costs
nothing, and the fake process group of ``torch.testing`` takes every
collective without moving a value. What the step does is recorded:

* every collective (kind, dtype, bytes) by phase;
* every host read of a device value (``.item()``, ``.tolist()``, a Python
  ``bool`` of a tensor), with the mmpfc line that made it: each one is a
  host-device synchronization on a real GPU. It returns 0, so the step goes
  on as if nothing overflowed and every label was in range (a host tensor's
  value, no synchronization, reads as 1: a step count);
* the dtype of every matrix product and convolution, with the line that
  ran it;
* with ``count_work``, every operator's floating-point operations
  (``torch.utils.flop_counter``'s formulas: products, convolutions,
  attention), the dtype they run in and the bytes it reads and writes
  (:class:`Work`), from which a step's time on a given GPU is estimated;
* the bytes of live CUDA tensors (distinct storages) after each phase, and
  the peak within it. The Python backward keeps every saved tensor until
  the graph is freed at the end of the phase, where the engine frees them
  node by node: the peak of a backward phase is an upper bound.

What a fake tensor cannot do is stubbed here, for the duration of the
context only, never in the library: the CUDA generator of mmpfc's random
streams (``RankGenerator``; a CPU generator stands in: draws on fake
tensors have no values anyway), CUDA events and streams, pinned
memory (``Tensor.pin_memory`` returns the tensor), and torch's check that
a CUDA driver exists before it enables CUDA autocast and ``GradScaler``.
The C++ autograd engine needs a driver, so ``Tensor.backward`` runs
:func:`.python_backward.run_backward` instead.

Private API (``FakeTensorMode``, the fake process group), checked on torch
2.11 and 2.14.
"""
from __future__ import annotations

import gc
import os
import sys
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from mmpfc.models.utils.rank_generator import RankGenerator

from .python_backward import record_function_inputs, run_backward, run_grad

__all__ = ['Collective', 'HostRead', 'Kernel', 'VirtualGPU', 'Work',
           'virtual_rank']

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HERE = os.path.dirname(os.path.abspath(__file__))
#: c10d op -> the collective's name in records
_KINDS = {'allreduce_': 'all_reduce', 'allgather_': 'all_gather',
          '_allgather_base_': 'all_gather',
          'reduce_scatter_': 'reduce_scatter',
          '_reduce_scatter_base_': 'reduce_scatter',
          'broadcast_': 'broadcast', 'barrier': 'barrier'}
_KERNELS = {'mm', 'addmm', 'bmm', 'baddbmm', 'matmul', 'linear',
            'convolution'}


@dataclass(frozen=True)
class Collective:
    """One collective call: ``kind`` is the c10d op (e.g. ``allreduce``),
    ``nbytes`` what this rank sends or reduces (input tensors)."""
    phase: str
    kind: str
    dtype: torch.dtype
    nbytes: int
    site: str


@dataclass
class HostRead:
    """A CUDA value read on the host: one synchronization on a GPU
    (``.tolist()`` of ``values`` elements is one read)."""
    phase: str
    site: str
    values: int = 1


@dataclass(frozen=True)
class Kernel:
    """A matrix product or convolution: its dtype and the mmpfc line that
    ran it (in backward, the line that started the backward)."""
    phase: str
    op: str
    dtype: torch.dtype
    site: str


@dataclass(frozen=True)
class Work:
    """What one operator does: ``flops`` floating-point operations in
    ``dtype`` (0 for all but products, convolutions and attention) and
    ``nbytes`` of tensors read and written."""
    phase: str
    op: str
    dtype: torch.dtype
    flops: int
    nbytes: int
    site: str


def _site() -> str:
    """``path:line`` of the innermost mmpfc frame outside this package,
    relative to the repository ('' when mmpfc is not on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if name.startswith(_PACKAGE) and not name.startswith(_HERE):
            rel = os.path.relpath(name, os.path.dirname(_PACKAGE))
            return f'{rel}:{frame.f_lineno}'
        frame = frame.f_back
    return ''


#: Indexed reads and in-place indexed writes touch the rows they address,
#: not the whole tensor they index (a shard of millions of centers).
_ROW_GATHERS = {'index_select', 'gather', 'index', 'embedding', 'take'}
_ROW_SCATTERS = {'index_copy_', 'index_add_', 'index_put_', '_index_put_impl_',
                 'scatter_', 'scatter_add_', 'scatter_reduce_',
                 'index_fill_', 'index_reduce_'}


def _tensor_bytes(tree) -> int:
    flat, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in flat
               if isinstance(t, torch.Tensor))


class VirtualGPU(FakeTensorMode):
    """A fake-tensor mode that records what a GPU step would do.

    Use :func:`virtual_rank` to get one with the process group and the
    stubs in place; :meth:`phase` names the part of the step that runs.
    """

    def __init__(self, count_work: bool = False) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.current_phase = 'setup'
        self.count_work = count_work
        self.work: List[Work] = []
        self.collectives: List[Collective] = []
        self.host_reads: List[HostRead] = []
        self.kernels: List[Kernel] = []
        self._last_read: Optional[Tuple[int, str]] = None
        self.live_after: Dict[str, int] = {}
        self.peak_in: Dict[str, int] = {}
        self._storages: Dict[int, Tuple[StorageWeakRef, int]] = {}
        self._live = 0

    # ------------------------------------------------------------- phases
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record what runs inside as ``name``; the live bytes at its end
        go to ``live_after[name]``, its peak to ``peak_in[name]``."""
        previous, self.current_phase = self.current_phase, name
        self.peak_in[name] = self.live_bytes()
        try:
            yield
        finally:
            # graphs that the C++ engine would free during backward are
            # freed here (reference cycles of nodes and saved tensors)
            gc.collect()
            self.live_after[name] = self.live_bytes()
            self.current_phase = previous

    def live_bytes(self) -> int:
        """Bytes of the CUDA storages that are alive now."""
        self._prune()
        return self._live

    def collectives_in(self, phase: str) -> List[Collective]:
        return [c for c in self.collectives if c.phase == phase]

    def host_reads_in(self, phase: str) -> List[HostRead]:
        return [r for r in self.host_reads if r.phase == phase]

    # ----------------------------------------------------------- dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket.__name__
        namespace = func.namespace
        if func is torch.ops.aten._local_scalar_dense.default:
            return self._record_read(args[0])
        self._last_read = None
        if namespace == 'c10d':
            self._record_collective(packet, args, kwargs)
        elif packet in _KERNELS:
            self.kernels.append(Kernel(self.current_phase, packet,
                                       args[0].dtype, _site()))
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self._track(out)
        if self.count_work and namespace == 'aten' and not func.is_view:
            self._record_work(func, args, kwargs, out)
        return out

    def _record_work(self, func, args, kwargs, out) -> None:
        packet = func._overloadpacket
        name = packet.__name__
        if packet not in flop_registry and name.endswith('_'):
            # an in-place product (addmm_) counts as its out-of-place one
            packet = getattr(torch.ops.aten, name[:-1], packet)
        flops = 0
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
        tensors = [t for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor)]
        dtype = tensors[0].dtype if tensors else torch.float32
        if name in _ROW_GATHERS:  # reads only the rows it returns
            nbytes = _tensor_bytes((args[1:], kwargs)) + \
                2 * _tensor_bytes(out)
        elif name in _ROW_SCATTERS:  # reads and writes only the rows given
            nbytes = 2 * _tensor_bytes((args[1:], kwargs))
        else:
            nbytes = _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        self.work.append(Work(self.current_phase, name, dtype, flops,
                              nbytes, _site()))

    def work_in(self, phase: str) -> List[Work]:
        return [w for w in self.work if w.phase == phase]

    def _record_read(self, tensor: torch.Tensor):
        """Record a read of a CUDA value (one per run of reads of one
        storage: ``tolist``) and return 0. A host value (a CPU tensor) is
        no synchronization: a floating one (Adam's step count) reads 1,
        never a zero divisor; an integer one (the label check's smallest
        and largest label, copied to pinned memory) reads 0, in range of
        any head."""
        if tensor.device.type != 'cuda':
            return _value(tensor.dtype,
                          1 if tensor.dtype.is_floating_point else 0)
        key = (StorageWeakRef(tensor.untyped_storage()).cdata, _site())
        if key == self._last_read:
            self.host_reads[-1].values += 1
        else:
            self._last_read = key
            self.host_reads.append(HostRead(self.current_phase, key[1]))
        return _value(tensor.dtype, 0)

    def _record_collective(self, packet: str, args, kwargs) -> None:
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if not tensors:
            return
        # the last tensor argument is the input of the _base_ ops
        # (output first); lists of inputs are summed
        source = tensors[-1:] if packet.endswith('_base_') else tensors
        self.collectives.append(Collective(
            self.current_phase, _KINDS.get(packet, packet),
            source[0].dtype, sum(t.numel() * t.element_size()
                                 for t in source), _site()))

    def _track(self, out) -> None:
        flat, _ = tree_flatten(out)
        for tensor in flat:
            if not isinstance(tensor, torch.Tensor) or \
                    tensor.device.type != 'cuda':
                continue
            storage = tensor.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in self._storages:
                continue
            nbytes = storage.nbytes()
            self._storages[ref.cdata] = (ref, nbytes)
            self._live += nbytes
            phase = self.current_phase
            if self._live > self.peak_in.get(phase, 0):
                self._prune()
                self.peak_in[phase] = max(self.peak_in.get(phase, 0),
                                          self._live)

    def _prune(self) -> None:
        for key, (ref, nbytes) in list(self._storages.items()):
            if ref.expired():
                del self._storages[key]
                self._live -= nbytes


def _value(dtype: torch.dtype, value: int):
    if dtype == torch.bool:
        return bool(value)
    return float(value) if dtype.is_floating_point else value


class _Event:
    """A CUDA event that is always complete."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _Stream:
    def __init__(self, device=None) -> None:
        self.device = device

    def synchronize(self) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


def _stand_in_generator(stream, device) -> torch.Generator:
    """``RankGenerator.get``: a CPU generator stands in for the CUDA one
    (creating that needs a driver; draws on fake tensors have no values),
    one per stream, so the stream is not recreated at every step."""
    generator = _STAND_INS.get(stream)
    if generator is None:
        generator = _STAND_INS[stream] = torch.Generator()
    return generator


_STAND_INS: 'weakref.WeakKeyDictionary' = weakref.WeakKeyDictionary()


@contextmanager
def virtual_rank(rank: int, world_size: int,
                 count_work: bool = False) -> Iterator[VirtualGPU]:
    """Be rank ``rank`` of ``world_size`` GPUs, in this process.

    Creates the fake process group (destroyed on exit; refused while
    another group exists) and enters a :class:`VirtualGPU` with the stubs
    listed in the module doc. Build models on ``torch.device('meta')`` and
    move them with ``module.to_empty(device='cuda')`` inside.
    ``count_work`` records every operator's :class:`Work`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f'rank must be in [0, {world_size}), got {rank}')
    if dist.is_initialized():
        raise RuntimeError('virtual_rank needs a process without a process '
                           'group; one is initialized already')
    import torch.cuda.amp.common as amp_common
    from torch.testing._internal.distributed.fake_pg import FakeStore
    mode = VirtualGPU(count_work)
    dist.init_process_group('fake', store=FakeStore(), rank=rank,
                            world_size=world_size)
    try:
        with ExitStack() as stack:
            for target, name, value in (
                    (amp_common, 'amp_definitely_not_available',
                     lambda: False),
                    (torch.cuda, 'Event', _Event),
                    (torch.cuda, 'current_stream', _Stream),
                    (torch.cuda, 'current_device', lambda: 0),
                    (RankGenerator, 'get', _stand_in_generator),
                    (torch.Tensor, 'pin_memory', lambda self, *a: self),
                    (torch.Tensor, 'is_pinned', lambda self, *a: True),
                    (torch.Tensor, 'backward', _backward),
                    (torch.autograd, 'grad', _grad)):
                stack.enter_context(mock.patch.object(target, name, value))
            stack.enter_context(record_function_inputs())
            stack.enter_context(mode)
            yield mode
    finally:
        dist.destroy_process_group()


def _backward(self, gradient=None, retain_graph=None, create_graph=False,
              inputs=None) -> None:
    if create_graph or inputs is not None:
        raise NotImplementedError('virtual ranks run a plain backward() '
                                  'only (no create_graph, no inputs)')
    run_backward(self, gradient)


def _grad(outputs, inputs, grad_outputs=None, retain_graph=None,
          create_graph=False, only_inputs=True, allow_unused=None,
          is_grads_batched=False, materialize_grads=False):
    """``torch.autograd.grad`` of one output w.r.t. leaf inputs."""
    if create_graph or is_grads_batched:
        raise NotImplementedError('virtual ranks compute first-order '
                                  'gradients only')
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 1:
            raise NotImplementedError('virtual ranks differentiate one '
                                      'output at a time')
        outputs = outputs[0]
        if isinstance(grad_outputs, (tuple, list)):
            grad_outputs = grad_outputs[0]
    single = isinstance(inputs, torch.Tensor)
    leaves = (inputs, ) if single else tuple(inputs)
    grads = run_grad(outputs, leaves, grad_outputs, bool(allow_unused))
    if materialize_grads:
        grads = tuple(torch.zeros_like(leaf) if g is None else g
                      for leaf, g in zip(leaves, grads))
    return grads
