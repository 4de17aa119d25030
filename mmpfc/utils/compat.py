"""Workarounds for library bugs, one place each, with the version they
work around.

Delete an entry once the upstream version named in it is no longer supported.
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist


def mmengine_checkpoint_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow to read MMEngine
    checkpoints (:func:`allowing_mmengine_checkpoints` allows them within a
    block: one :func:`torch_load`, or a ``PartialFCRunner``'s run).

    Works around torch >= 2.6 defaulting ``weights_only=True`` while
    mmengine 0.10.7 stores ``HistoryBuffer`` objects and numpy
    scalars/arrays in ``message_hub`` of every checkpoint: without them,
    ``--resume`` fails with
    ``UnpicklingError: Weights only load failed``. mmengine 0.10.7 also
    pickles ``HistoryBuffer``'s statistics methods as
    ``getattr(HistoryBuffer, 'min')``, so ``getattr`` is allowed too; the
    unpickler still only reaches attributes of the allowed objects.
    """
    import builtins

    from mmengine.logging import HistoryBuffer
    safe = [HistoryBuffer, np.ndarray, np.dtype, builtins.getattr]
    multiarray = getattr(np, '_core', np.core).multiarray
    safe.append(multiarray._reconstruct)
    safe.append(multiarray.scalar)
    # numpy 2 pickles dtypes through their classes (numpy.dtypes.Float64DType)
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        safe.extend(getattr(dtypes, name) for name in dir(dtypes)
                    if name.endswith('DType'))
    return safe


# torch >= 2.10 names the tensor collectives *_single and deprecates the
# *_tensor names; delete the fallbacks once torch < 2.10 is unsupported.
all_gather_into = getattr(dist, 'all_gather_single', None) or \
    dist.all_gather_into_tensor
reduce_scatter_into = getattr(dist, 'reduce_scatter_single', None) or \
    dist.reduce_scatter_tensor


def ddp_ignore(module: torch.nn.Module, names) -> None:
    """Make DDP leave the tensors ``names`` of ``module`` alone (no
    broadcast at wrap time, no gradient all-reduce).

    torch (checked up to 2.14) offers this only through the private
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``;
    replace it when a public API exists.
    """
    from torch.nn.parallel import DistributedDataParallel
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, sorted(names))


def ddp_arguments(module: torch.nn.Module, device_ids, kwargs: dict):
    """``(device_ids, kwargs)`` that this torch's DDP accepts for ``module``.

    * mmengine 0.10.7 ``Runner.wrap_model`` passes
      ``device_ids=[LOCAL_RANK]``, which DDP rejects for a CPU module: None.
    * torch >= 2.14 deprecates ``broadcast_buffers`` for
      ``forward_sync_buffers``; the replacement still syncs the replicated
      buffers once at wrap time. Delete once torch < 2.14 is unsupported.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    if tensor is None or tensor.device.type == 'cpu':
        device_ids = None
    kwargs = dict(kwargs)
    if 'broadcast_buffers' in kwargs and 'forward_sync_buffers' in \
            inspect.signature(DistributedDataParallel.__init__).parameters:
        kwargs.setdefault('forward_sync_buffers',
                          kwargs.pop('broadcast_buffers'))
    return device_ids, kwargs


def scoped_registry_name(registry, cls: type) -> str:
    """``scope.Name`` under which ``cls`` is registered in ``registry`` or
    one of its parents.

    mmengine 0.10.7 ``Runner.wrap_model`` builds the wrapper from the root
    ``MODEL_WRAPPERS`` registry: a bare name of a child scope is not found
    there, a scoped one is.
    """
    while registry is not None:
        for name, obj in registry.module_dict.items():
            if obj is cls:
                return f'{registry.scope}.{name}'
        registry = registry.parent
    raise KeyError(f'{cls.__name__} is not registered')


def warn_if_loop_sleeps(loop, logger) -> None:
    """mmengine 0.10.7 ``IterBasedTrainLoop`` sleeps 2 s at every pass
    over the data unless the sampler is infinite: say so at start-up."""
    from mmengine.dataset import InfiniteSampler
    from mmengine.runner import IterBasedTrainLoop
    dataloader = getattr(loop, 'dataloader', None)
    if isinstance(loop, IterBasedTrainLoop) and dataloader is not None and \
            not isinstance(dataloader.sampler, InfiniteSampler):
        logger.warning(
            f'IterBasedTrainLoop with {type(dataloader.sampler).__name__}: '
            'MMEngine 0.10 sleeps 2 s at every pass over the data; use '
            "sampler=dict(type='InfiniteSampler')")


def torch_load(path: str, map_location=None, mmap: bool = False):
    """``torch.load``, memory-mapped where the file format allows it; the
    objects of :func:`mmengine_checkpoint_globals` are allowed.

    torch (checked up to 2.14) cannot memory-map the legacy (pre torch 1.6,
    non-zip) format and raises a ``RuntimeError`` about the zipfile format:
    such a file is read without ``mmap`` instead.
    """
    with allowing_mmengine_checkpoints():
        try:
            return torch.load(path, map_location=map_location, mmap=mmap)
        except RuntimeError as err:
            if not mmap or 'zipfile' not in str(err):
                raise
        return torch.load(path, map_location=map_location)


def allowing_mmengine_checkpoints():
    """A block within which ``torch.load(weights_only=True)`` reads MMEngine
    checkpoints (:func:`mmengine_checkpoint_globals`); after it, torch's
    allow-list is what it was, entries added before by others included
    (torch < 2.5 has no such block; its ``weights_only`` is off by default
    there)."""
    context = getattr(torch.serialization, 'safe_globals', None)
    if context is None:
        return nullcontext()
    allowed = torch.serialization.get_safe_globals()
    return context([obj for obj in mmengine_checkpoint_globals()
                    if obj not in allowed])


#: ``torch.onnx.export`` arguments: torch >= 2.9 defaults to the dynamo
#: exporter, which needs the onnxscript package; the TorchScript exporter
#: needs nothing more. Drop once onnxscript is a requirement.
ONNX_EXPORT_KWARGS = dict(dynamo=False)


def grad_scaler_found_inf(scaler: torch.amp.GradScaler,
                          optimizer: torch.optim.Optimizer) -> dict:
    """The per-device overflow flags ``scaler.unscale_(optimizer)`` recorded.

    torch 2.x (checked up to 2.14) offers no public way to change the skip
    decision of ``GradScaler.step``; ranks whose shards overflow must share
    that decision, so we read and overwrite these flags. The dict is empty
    before ``unscale_``.
    """
    return scaler._per_optimizer_states[id(optimizer)]['found_inf_per_device']


def grad_scaler_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The current loss scale as the scaler's device tensor, not read.

    ``GradScaler.get_scale()`` returns a Python float (a device sync on
    CUDA); torch 2.x (checked up to 2.14) has no public accessor for the
    tensor, so the private ``_scale`` is read. The scale exists once
    ``scaler.scale(loss)`` has run.
    """
    scale = getattr(scaler, '_scale', None)
    if scale is None:
        raise RuntimeError('the loss scale is read before the first '
                           'backward: call wrapper.backward(loss) first')
    return scale


def storage_use_count(tensor: torch.Tensor) -> int | None:
    """How many tensors share ``tensor``'s storage, or None if unknown.

    torch 2.14 has no public API for it; ``torch._C._storage_Use_Count`` is
    the private one its own tests use. None (never "unshared") wherever it
    is missing, so a caller that reuses memory falls back to allocating.
    """
    use_count = getattr(torch._C, '_storage_Use_Count', None)
    if use_count is None:
        return None
    try:
        # minus the reference held by the temporary storage object itself
        return int(use_count(tensor.untyped_storage()._cdata)) - 1
    except (AttributeError, RuntimeError, TypeError):
        return None
