"""Workarounds for library bugs, one place each, with the version they work around.

Delete an entry once the upstream version named in it is no longer supported.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def allow_mmengine_checkpoint_globals() -> None:
    """Let ``torch.load(weights_only=True)`` read MMEngine checkpoints.

    Works around torch >= 2.6 defaulting ``weights_only=True`` while
    mmengine 0.10.7 stores ``HistoryBuffer`` objects and numpy scalars/arrays in
    ``message_hub`` of every checkpoint: without this, ``--resume`` fails with
    ``UnpicklingError: Weights only load failed``. mmengine 0.10.7 also
    pickles ``HistoryBuffer``'s statistics methods as
    ``getattr(HistoryBuffer, 'min')``, so ``getattr`` is allow-listed too; the
    unpickler still only reaches attributes of the allow-listed objects.
    """
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is None:  # torch < 2.4: weights_only is not default
        return
    from mmengine.logging import HistoryBuffer
    import builtins
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


def init_process_group_for_device(launcher: str = 'pytorch',
                                  backend: str | None = None,
                                  **kwargs) -> None:
    """Initialize ``torch.distributed`` so that CPU-only machines work.

    Works around mmengine 0.10.7 ``init_dist('pytorch')`` calling
    ``torch.cuda.set_device`` unconditionally (it raises on a machine without
    CUDA). On CUDA machines this defers to mmengine (NCCL); without CUDA it
    creates the gloo group itself from the torchrun / slurm environment, and
    MMEngine's ``Runner.setup_env`` then sees an initialized group and skips
    its own init.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if torch.cuda.is_available():
        from mmengine.dist import init_dist
        init_dist(launcher, backend=backend or 'nccl', **kwargs)
        return
    if launcher == 'slurm':
        _export_slurm_env(kwargs.get('port'))
    missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
               if k not in os.environ]
    if missing:
        raise RuntimeError(
            f'launcher={launcher!r} needs a process group, but the environment '
            f'lacks {missing}: start with torchrun (tools/dist_train.sh) or '
            f'srun (tools/slurm_train.sh), or use --launcher none.')
    dist.init_process_group(backend=backend or 'gloo')


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


allow_mmengine_checkpoint_globals()


def grad_scaler_found_inf(scaler: torch.amp.GradScaler,
                          optimizer: torch.optim.Optimizer) -> dict:
    """The per-device overflow flags ``scaler.unscale_(optimizer)`` recorded.

    torch 2.x (checked up to 2.14) offers no public way to change the skip
    decision of ``GradScaler.step``; ranks whose shards overflow must share
    that decision, so we read and overwrite these flags. The dict is empty
    before ``unscale_``.
    """
    return scaler._per_optimizer_states[id(optimizer)]['found_inf_per_device']


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
