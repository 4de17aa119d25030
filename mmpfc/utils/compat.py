"""Workarounds for library bugs, one place each, with the version they
work around.

Delete an entry once the upstream version named in it is no longer supported.
"""
from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


def allow_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` read MMEngine checkpoints.

    Works around torch >= 2.6 defaulting ``weights_only=True`` while
    mmengine 0.10.7 stores ``HistoryBuffer`` objects and numpy
    scalars/arrays in ``message_hub`` of every checkpoint: without this,
    ``--resume`` fails with
    ``UnpicklingError: Weights only load failed``. mmengine 0.10.7 also
    pickles ``HistoryBuffer``'s statistics methods as
    ``getattr(HistoryBuffer, 'min')``, so ``getattr`` is allow-listed too; the
    unpickler still only reaches attributes of the allow-listed objects.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # torch < 2.4: weights_only is not default
        return
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
    add_safe_globals(safe)


#: Environment variable that overrides the default process-group backend.
BACKEND_ENV = 'MMPFC_DIST_BACKEND'


def choose_backend(backend: str | None = None) -> str:
    """The ``torch.distributed`` backend to use, chosen explicitly.

    In order: ``backend`` (e.g. ``env_cfg.dist_cfg.backend`` of a config),
    the environment variable ``MMPFC_DIST_BACKEND``, then the default: NCCL
    when CUDA is available and the launcher gives this process a local rank
    that names one of the visible GPUs (``LOCAL_RANK``, or ``SLURM_LOCALID``
    under slurm), gloo otherwise (a CPU-only machine, or a CPU job on a GPU
    machine started with ``CUDA_VISIBLE_DEVICES=``).
    """
    if backend:
        return backend
    env = os.environ.get(BACKEND_ENV, '').strip()
    if env:
        return env
    local_rank = os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID'))
    if torch.cuda.is_available() and local_rank is not None and \
            local_rank.strip().isdigit() and \
            int(local_rank) < torch.cuda.device_count():
        return 'nccl'
    return 'gloo'


def init_process_group_for_device(launcher: str = 'pytorch',
                                  backend: str | None = None,
                                  start_timeout: float | None = 300.0,
                                  **kwargs) -> None:
    """Initialize ``torch.distributed``, the backend by :func:`choose_backend`.

    Outside torchrun's agent (ranks started by hand or by a scheduler with
    the env:// variables), the ranks meet through a store that waits at most
    ``start_timeout`` seconds for all of them, so that a missing peer (one
    process started with ``WORLD_SIZE=2``) fails with a message instead of
    hanging for the collective timeout (30 min). ``None`` waits that long.

    Works around mmengine 0.10.7 ``init_dist('pytorch')`` calling
    ``torch.cuda.set_device`` unconditionally (it raises on a machine without
    CUDA). NCCL defers to mmengine (which binds the process to the GPU of its
    local rank); any other backend (gloo) creates the group itself from the
    torchrun / slurm environment, and MMEngine's ``Runner.setup_env`` then
    sees an initialized group and skips its own init.
    """
    if dist.is_available() and dist.is_initialized():
        return
    backend = choose_backend(backend)
    if backend == 'nccl':
        if not torch.cuda.is_available():
            raise RuntimeError(
                "backend='nccl' needs CUDA, but torch.cuda.is_available() is "
                f"False: use backend='gloo' (or unset {BACKEND_ENV})")
        from mmengine.dist import init_dist
        if launcher == 'pytorch':
            kwargs.update(_rendezvous(launcher, start_timeout,
                                      kwargs.get('timeout')))
        init_dist(launcher, backend=backend, **kwargs)
        return
    if launcher == 'slurm':
        _export_slurm_env(kwargs.pop('port', None))
    dist.init_process_group(backend=backend, **kwargs, **_rendezvous(
        launcher, start_timeout, kwargs.get('timeout')))


def _rendezvous(launcher: str, start_timeout: float | None,
                timeout: timedelta | None) -> dict:
    """``init_process_group`` arguments from the env:// variables, with a
    store that gives up after ``start_timeout`` s if a rank is missing."""
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'launcher={launcher!r} needs a process group, but the '
            f'environment lacks {missing}: start with torchrun '
            '(tools/dist_train.sh) or '
            f'srun (tools/slurm_train.sh), or use --launcher none.')
    rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    # torchrun's agent has gathered every rank already and serves the store
    if start_timeout is None or \
            os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True':
        return dict(rank=rank, world_size=world_size)
    addr, port = os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT'])
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=rank == 0,
                              timeout=timedelta(seconds=start_timeout),
                              wait_for_workers=True)
    except RuntimeError as err:  # DistStoreError and timeouts
        raise RuntimeError(
            f'rank {rank} of WORLD_SIZE={world_size}: not every rank joined '
            f'at MASTER_ADDR={addr} MASTER_PORT={port} within '
            f'start_timeout={start_timeout:g} s. Start all {world_size} '
            'processes (bash tools/dist_train.sh CONFIG NPROC, or torchrun '
            '--nproc-per-node), check WORLD_SIZE / MASTER_ADDR / '
            'MASTER_PORT, or raise env_cfg.dist_cfg.start_timeout '
            f'({type(err).__name__}: {str(err).splitlines()[0]})') from err
    # later store operations (barriers, new groups) get the usual patience
    store.set_timeout(timeout or timedelta(minutes=30))
    return dict(rank=rank, world_size=world_size, store=store)


def _export_slurm_env(port: int | None) -> None:
    """Translate SLURM variables into the torch.distributed env:// ones."""
    import subprocess
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in os.environ:
        node_list = os.environ['SLURM_NODELIST']
        addr = subprocess.getoutput(
            f'scontrol show hostname {node_list} | head -n1')
        os.environ['MASTER_ADDR'] = addr
    os.environ.setdefault('MASTER_PORT', str(port or 29500))


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


def init_amp_optim_wrapper_anywhere(wrapper, **kwargs) -> None:
    """``OptimWrapper.__init__`` for an ``AmpOptimWrapper`` subclass.

    mmengine 0.10.7 ``AmpOptimWrapper.__init__`` asserts a CUDA, NPU, MLU
    or MUSA device (no CPU autocast) and builds a CUDA loss scaler; the
    subclass builds its own scaler for the parameters' device instead.
    """
    from mmengine.optim import OptimWrapper
    OptimWrapper.__init__(wrapper, **kwargs)


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


def build_in_scope(registry, cfg):
    """Build a transform (or any config) from ``registry`` whatever the
    current default scope is.

    mmengine 0.10.7's ``Compose`` looks dicts up in the current default
    scope, so a dataset built outside a Runner (scripts, tests) would not
    find mmpfc's transforms.
    """
    return registry.build(cfg) if isinstance(cfg, dict) else cfg


def torch_load(path: str, map_location=None, mmap: bool = False):
    """``torch.load``, memory-mapped where the file format allows it.

    torch (checked up to 2.14) cannot memory-map the legacy (pre torch 1.6,
    non-zip) format and raises a ``RuntimeError`` about the zipfile format:
    such a file is read without ``mmap`` instead.
    """
    try:
        return torch.load(path, map_location=map_location, mmap=mmap)
    except RuntimeError as err:
        if not mmap or 'zipfile' not in str(err):
            raise
    return torch.load(path, map_location=map_location)


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
