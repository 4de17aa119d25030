"""Creating the process group: the backend for the device, a rendezvous that
gives up when a rank is missing, SLURM's variables for env://.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

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

    One path for both backends and the torchrun / slurm launchers: the group
    is created here from their environment (NCCL first binds the process to
    the GPU of its local rank), and MMEngine's ``Runner.setup_env`` then sees
    an initialized group and skips its own init. MMEngine's ``init_dist``,
    which calls ``torch.cuda.set_device`` unconditionally (raising on a
    machine without CUDA) and sets the process-wide multiprocessing start
    method to ``spawn``, is left to NCCL under other launchers (``mpi``).
    A ``timeout`` in seconds (MMEngine's convention) is taken as such.
    """
    if dist.is_available() and dist.is_initialized():
        return
    backend = choose_backend(backend)
    if backend == 'nccl' and not torch.cuda.is_available():
        raise RuntimeError(
            "backend='nccl' needs CUDA, but torch.cuda.is_available() is "
            f"False: use backend='gloo' (or unset {BACKEND_ENV})")
    if backend == 'nccl' and launcher not in ('pytorch', 'slurm'):
        from mmengine.dist import init_dist
        init_dist(launcher, backend=backend, **kwargs)
        return
    if isinstance(kwargs.get('timeout'), (int, float)):
        kwargs['timeout'] = timedelta(seconds=kwargs['timeout'])
    if launcher == 'slurm':
        _export_slurm_env(kwargs.pop('port', None))
    if backend == 'nccl':  # the GPU MMEngine's DDP wrapper will name too
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
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

    # a launcher inside srun (torchrun per node) has set its own already
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ.get('SLURM_LOCALID', '0'))
    if 'MASTER_ADDR' not in os.environ:
        node_list = os.environ['SLURM_NODELIST']
        addr = subprocess.getoutput(
            f'scontrol show hostname {node_list} | head -n1')
        os.environ['MASTER_ADDR'] = addr
    os.environ.setdefault('MASTER_PORT', str(port or 29500))
