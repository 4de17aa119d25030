"""Will a config fit on N GPUs of a given memory, and how fast will it run?

    python tools/fit_check.py configs/pfc/r50_pfc0.1_3m.py --gpus 8 \\
        --gpu-memory 32GB
    python tools/fit_check.py CONFIG --gpus 4 --gpu-memory 12GB --json \\
        --cfg-options model.head.num_classes=2000000

Runs on any machine, GPU or not, in seconds: the peak per GPU and its parts,
whether it fits, the most identities and the largest batch that fit, the
sample rate or storage that would make it fit, and the step time estimated
for ``--gpu`` (V100, A100, H100, H200). With ``--run-log``, the
prediction is put beside what a finished run of the config measured (its
log's speed lines and memory tables). See docs/training.md, "Will it fit".
"""
import argparse
import json
import sys

from mmengine.config import Config, DictAction

from mmpfc.benchmark.fit_check import check_fit, describe, parse_size
from mmpfc.benchmark.run_log import compare_with_run, read_run_log


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='training config file')
    parser.add_argument('--gpus', type=int, required=True,
                        help='number of GPUs (ranks) in all')
    parser.add_argument('--gpu-memory', default=None,
                        help="memory per GPU, e.g. '32GB', '24GiB' "
                        '(default: that of --gpu)')
    parser.add_argument('--gpu', default='V100',
                        help='GPU of the step-time estimate: V100, A100, '
                        'H100 or H200, or a device name holding one '
                        '(default V100)')
    parser.add_argument('--no-timing', action='store_true',
                        help='memory only (skips the virtual steps)')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object')
    parser.add_argument('--run-log', default=None,
                        help="a finished run's log (or saved console "
                        'output): print its measured speed and memory '
                        'beside the prediction')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        budget = None if args.gpu_memory is None else parse_size(
            args.gpu_memory)
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        report = check_fit(cfg, args.gpus, budget, args.gpu, args.config,
                           timing=not args.no_timing)
        run = None if args.run_log is None else read_run_log(args.run_log)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f'fit_check: {err}', file=sys.stderr)
        return 2
    if args.json:
        out = report.to_dict()
        if run is not None:  # the measured figures, under 'run'
            out['run'] = dict(vars(run), steady_speed=run.steady_speed)
        print(json.dumps(out))
        return 0
    print(describe(report))
    if run is not None:
        print(compare_with_run(report.to_dict(), run, args.config))
    return 0


if __name__ == '__main__':
    sys.exit(main())
