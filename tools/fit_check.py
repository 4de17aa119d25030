"""Will a config fit on N GPUs of a given memory, and how fast will it run?

    python tools/fit_check.py configs/pfc/r50_pfc0.1_3m.py --gpus 8 \\
        --gpu-memory 32GB
    python tools/fit_check.py CONFIG --gpus 4 --gpu-memory 12GB --json \\
        --cfg-options model.head.num_classes=2000000

Runs on any machine, GPU or not, in seconds: the peak per GPU and its parts,
whether it fits, the most identities and the largest batch that fit, the
sample rate or storage that would make it fit, and the step time estimated
for ``--gpu`` (V100, A100, H100). See docs/training.md, "Will it fit".
"""
import argparse
import json
import sys

from mmengine.config import Config, DictAction

from mmpfc.benchmark.fit_check import check_fit, describe, parse_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='training config file')
    parser.add_argument('--gpus', type=int, required=True,
                        help='number of GPUs (ranks) in all')
    parser.add_argument('--gpu-memory', default=None,
                        help="memory per GPU, e.g. '32GB', '24GiB' "
                        '(default: that of --gpu)')
    parser.add_argument('--gpu', default='V100',
                        help='GPU of the step-time estimate: V100, A100 or '
                        'H100 (default V100)')
    parser.add_argument('--no-timing', action='store_true',
                        help='memory only (skips the virtual steps)')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object')
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
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f'fit_check: {err}', file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict()) if args.json else describe(report))
    return 0


if __name__ == '__main__':
    sys.exit(main())
