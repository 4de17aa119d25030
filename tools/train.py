"""Train a face recognizer with MMEngine (mmpfc configs).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]]
                                 [--overwrite] [--amp]
                                 [--cfg-options k=v ...] [--launcher ...]

Distributed: ``bash tools/dist_train.sh CONFIG GPUS`` (torchrun) or
``bash tools/slurm_train.sh PARTITION JOB CONFIG``. Without CUDA the same
commands run on the CPU with gloo.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction
# A failing rank's traceback becomes torchrun's closing "root cause" report.
from torch.distributed.elastic.multiprocessing.errors import record

AMP_WRAPPER = 'PartialFCAmpOptimWrapper'
FP32_WRAPPERS = ('OptimWrapper', 'PartialFCOptimWrapper')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a face recognizer')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='resume from this checkpoint; without a path, from the latest '
        'checkpoint in the work dir, or, with none there, start from the '
        "config's load_from")
    parser.add_argument(
        '--overwrite', action='store_true',
        help='start a new run in a work dir that holds checkpoints of '
        'another run, replacing them (without it the run refuses)')
    parser.add_argument(
        '--amp', action='store_true',
        help='mixed precision: fp16 with loss scaling on GPUs, bf16 '
        'autocast on the CPU')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value (e.g. '
        'train_dataloader.batch_size=16)')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK;
    # under srun, Slurm's local id (read when the group is made) decides
    parser.add_argument('--local_rank', '--local-rank', type=int,
                        default=None)
    args = parser.parse_args(argv)
    if args.local_rank is not None or args.launcher != 'slurm':
        os.environ.setdefault('LOCAL_RANK', str(args.local_rank or 0))
    return args


def use_amp(cfg: Config) -> None:
    """Switch the optim wrapper to mixed precision (``--amp``)."""
    wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
    name = wrapper.split('.')[-1] if isinstance(wrapper, str) else \
        getattr(wrapper, '__name__', str(wrapper))
    if name == AMP_WRAPPER:
        return
    if name not in FP32_WRAPPERS:
        raise ValueError(
            f'--amp cannot convert optim_wrapper type {wrapper!r}; expected '
            f'one of {FP32_WRAPPERS} or {AMP_WRAPPER!r}')
    cfg.optim_wrapper.type = AMP_WRAPPER
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def build_cfg(args: argparse.Namespace) -> Config:
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.overwrite:
        cfg.overwrite = True
    if args.amp:
        use_amp(cfg)
    if args.resume == 'auto' and _understands_auto_resume(cfg):
        cfg.resume = 'auto'  # the work dir's latest, else load_from
    elif args.resume == 'auto':  # MMEngine's: load_from would be resumed
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def _understands_auto_resume(cfg: Config) -> bool:
    """Whether the config's runner is a ``PartialFCRunner`` (which takes
    ``resume='auto'``; MMEngine's runners take a bool)."""
    from mmengine.registry import RUNNERS as MMENGINE_RUNNERS

    from mmpfc.engine.runners import PartialFCRunner
    runner_type = cfg.get('runner_type', 'Runner')
    if isinstance(runner_type, str):
        from mmpfc.registry import RUNNERS
        runner_type = RUNNERS.get(runner_type) or \
            MMENGINE_RUNNERS.get(runner_type)
    return isinstance(runner_type, type) and issubclass(runner_type,
                                                        PartialFCRunner)


@record
def main(argv=None) -> None:
    args = parse_args(argv)
    import mmpfc  # noqa: F401  (registers every component)
    from mmpfc.engine.hooks import PREEMPTED_EXIT_CODE, TrainingPreempted
    from mmpfc.registry import RUNNERS
    cfg = build_cfg(args)
    runner = RUNNERS.build(cfg)
    try:
        runner.train()
    except TrainingPreempted as stop:
        # saved and stopped on SIGTERM / SIGUSR1: exit "resume me"
        print(f'train.py: {stop}', file=sys.stderr)
        if not stop.agreed:  # peers gone: no collective may wait for them
            sys.stderr.flush()
            os._exit(PREEMPTED_EXIT_CODE)
        close_process_group()
        sys.exit(PREEMPTED_EXIT_CODE)
    close_process_group()


def close_process_group() -> None:
    """Leave together: a rank exiting while a peer still talks to it can
    abort the peer (gloo), and torch warns about undestroyed groups."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
