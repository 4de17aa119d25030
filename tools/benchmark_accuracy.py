"""Accuracy of data parallel, model parallel and Partial FC heads.

Trains the same small model (LeNet-5 + a linear/BN neck, 128-d, CosFace) on
a learnable synthetic identity problem once per head configuration and
seed, on W gloo ranks, and scores each with the insightface 10-fold
verification protocol on pairs of held-out identities:

    python tools/benchmark_accuracy.py          # the default: minutes
    python tools/benchmark_accuracy.py --quick  # seconds: a smoke run
    python tools/benchmark_accuracy.py --methods mp,pfc0.1 --seeds 0,1,2,3,4

A method is dp (MarginSoftmaxHead, replicated), mp (PartialFCHead with
sample rate 1.0) or pfc<rate>, optionally followed by ':'-separated
KEY=VALUE options: 'label=NAME' names the row, 'optim.KEY=VALUE' goes to the
PartialFCOptimWrapper config, any other KEY (or 'head.KEY') to the head
config, values read as Python literals where they are ones. Without a label
a row is named by its options (PFC0.1:center_dtype=bfloat16):

    --methods mp,pfc0.1,pfc0.1:center_dtype=bfloat16
    --methods mp,pfc0.1:optim.center_state_dtype=int8:label=PFC0.1-int8
    --methods '["mp", {"name": "pfc0.1", "head": {"init_std": 0.02}}]'

The kwargs are passed through unchanged; one the head or the wrapper does
not accept makes it raise (each method is built once before any run, so
that fails at once, naming the method). Prints a Markdown table (mean +- std
over seeds) and whether PFC0.1 is within 0.5 points of model parallel, and
writes accuracy.md and accuracy.json (every seed's figures) to --out-dir.
The default methods include PFC0.1 with bf16 centers and with bf16 centers
plus int8 momentum; each compact PFC0.1 row (stochastic rounding) is
checked to lie within 0.3 points of fp32 PFC0.1. To see what stochastic
rounding is for, add its round-to-nearest twin:

    --methods 'pfc0.1,pfc0.1:center_dtype=bfloat16,\
pfc0.1:center_dtype=bfloat16:center_rounding=nearest'
"""
from __future__ import annotations

import argparse
import ast
import os
import os.path as osp
import sys
import time
from dataclasses import asdict

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmpfc.benchmark.accuracy import (AccuracyConfig, check_line,
                                      compact_storage_labels, markdown,
                                      paired_difference, run_accuracy,
                                      summarize, write_json)
from mmpfc.utils.spawn import load_average

#: How far (accuracy points) PFC0.1 may lie from model parallel.
PFC_TOLERANCE_POINTS = 0.5
#: How far (accuracy points) a compact storage of the centers (16-bit
#: centers, compact optimizer state) may lie from fp32 PFC0.1.
STORAGE_TOLERANCE_POINTS = 0.3
#: ``--quick``: tiny sizes for a smoke run (the test uses them)
QUICK = dict(seeds=(0, ), num_classes=100, eval_identities=40, num_pairs=200,
             steps=60, warmup_steps=5, batch_size=16, probe_batches=1)


def _seeds(text: str) -> list:
    try:
        seeds = [int(s) for s in text.split(',') if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(
            f'--seeds {text!r}: expected a comma list of integers, e.g. '
            '0,1,2')
    return seeds


def _data_option(text: str) -> tuple:
    key, sep, value = text.partition('=')
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f'--data {text!r}: expected KEY=VALUE, e.g. noise_std=30')
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f'--data {text!r}: the value must be a number, got '
            f'{value!r}') from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='\n\n'.join(__doc__.split('\n\n')[1:]))
    defaults = AccuracyConfig()
    parser.add_argument('--methods', default=defaults.methods,
                        help="comma list of dp, mp, pfc<rate>, each with "
                        "optional ':KEY=VALUE' head / 'optim.KEY=VALUE' "
                        'optim-wrapper kwargs (passed through; unknown ones '
                        'raise in the head or wrapper), or a JSON list; see '
                        'below (default: %(default)s)')
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes (1 seed, 100 identities, 60 steps, '
                        '200 pairs): a smoke run; options given '
                        'explicitly still apply')
    parser.add_argument('--seeds', type=_seeds, default=None,
                        help='comma list of seeds (default: 0,1,2)')
    parser.add_argument('--num-classes', type=int, default=None,
                        help='training identities (default: %d)'
                        % defaults.num_classes)
    parser.add_argument('--eval-identities', type=int, default=None,
                        help='held-out identities the pairs come from '
                        '(default: %d)' % defaults.eval_identities)
    parser.add_argument('--pairs', type=int, default=None, dest='num_pairs',
                        help='verification pairs, half same (default: %d)'
                        % defaults.num_pairs)
    parser.add_argument('--steps', type=int, default=None,
                        help='training steps (default: %d)' % defaults.steps)
    parser.add_argument('--warmup-steps', type=int, default=None,
                        help='linear lr warm-up steps, then poly decay '
                        '(default: %d)' % defaults.warmup_steps)
    parser.add_argument('--batch-size', type=int, default=None,
                        help='samples per rank (default: %d)'
                        % defaults.batch_size)
    parser.add_argument('--embedding-size', type=int, default=None)
    parser.add_argument('--lr', type=float, default=None,
                        help='SGD lr, momentum 0.9 (default: %g)'
                        % defaults.lr)
    parser.add_argument('--weight-decay', type=float, default=None)
    parser.add_argument('--margin', choices=['cosface', 'arcface'],
                        default=None, help='default: cosface')
    parser.add_argument('--margin-value', type=float, default=None,
                        help='m of the margin (default: 0.2)')
    parser.add_argument('--scale', type=float, default=None,
                        help='logit scale s (default: %g)' % defaults.scale)
    parser.add_argument('--data', type=_data_option, action='append',
                        default=[], metavar='KEY=VALUE',
                        help='SyntheticIdentityDataset argument, e.g. '
                        'noise_std=30 (repeatable)')
    parser.add_argument('--nproc', type=int, default=None,
                        help='gloo ranks (default: 2)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads per rank (default: cores / '
                        'ranks)')
    parser.add_argument('--timeout', type=float, default=None,
                        help='seconds per seed (default: 1800)')
    parser.add_argument('--out-dir', default='work_dirs/benchmark_accuracy')
    parser.add_argument('--check', action='store_true',
                        help='exit with status 1 if the PFC0.1 check fails')
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> AccuracyConfig:
    """The config: defaults, then ``--quick``'s sizes, then the options."""
    values = dict(QUICK) if args.quick else {}
    for key in ('methods', 'seeds', 'num_classes', 'eval_identities',
                'num_pairs', 'steps', 'warmup_steps', 'batch_size',
                'embedding_size', 'lr', 'weight_decay', 'margin',
                'margin_value', 'scale', 'threads', 'timeout'):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.nproc is not None:
        values['world_size'] = args.nproc
    values['data'] = dict(args.data)
    cfg = AccuracyConfig(**values)
    cfg.validate()
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    info = asdict(cfg)
    info.update(threads=cfg.resolved_threads(), loss=cfg.loss_config(),
                command=' '.join(['python tools/benchmark_accuracy.py',
                                  *(argv if argv is not None
                                    else sys.argv[1:])]),
                load_average_start=load_average())
    print(f'{cfg.world_size} gloo ranks, {info["threads"]} thread(s) each; '
          f'{len(cfg.seeds)} seed(s) x {len(cfg.method_specs())} methods; '
          f'load average {info["load_average_start"]}', flush=True)
    start = time.time()
    try:
        records = run_accuracy(cfg, log=lambda s: print(s, flush=True))
    except ValueError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    wall = time.time() - start
    info['load_average_end'] = load_average()
    rows = summarize(records)
    check = paired_difference(records, 'PFC0.1', 'MP', PFC_TOLERANCE_POINTS)
    storage_checks = [
        c for c in (paired_difference(records, label, 'PFC0.1',
                                      STORAGE_TOLERANCE_POINTS)
                    for label in compact_storage_labels(records))
        if c is not None]
    table = markdown(rows)
    verdict = '\n'.join([check_line(check)] + [
        check_line(c, 'fp32 PFC0.1') for c in storage_checks])
    with open(osp.join(args.out_dir, 'accuracy.md'), 'w') as f:
        f.write(f'{table}\n\n{verdict}\n')
    write_json(osp.join(args.out_dir, 'accuracy.json'), info, records, rows,
               check, wall, storage_checks)
    print(f'\n{table}\n\n{verdict}')
    print(f'{wall:.0f} s; wrote {args.out_dir}/accuracy.md and '
          f'accuracy.json; load average {info["load_average_end"]}')
    if args.check and not (check and check.passed and all(
            c.passed for c in storage_checks)):
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
