"""Images/s of one DataLoader worker for a config's training pipeline, beside
bare JPEG decoding of the same bytes, and the workers a GPU needs.

    python tools/benchmark_data.py configs/_base_/datasets/ms1mv3.py
    python tools/benchmark_data.py configs/_base_/datasets/ms1mv3.py \\
        --samples-per-sec 662 --pipeline mmpretrain --json
    python tools/benchmark_data.py CONFIG --data-root data/ms1m-retinaface-t1

Without ``--data-root`` a RecordIO set of synthetic 112x112 JPEG faces
(quality 95, ~8.8 KB, like MS1MV3's) is written to a temporary folder. The
loader is the config's train dataloader (dataset, pipeline, collate) with one
worker and one thread; ``--pipeline`` swaps in the lean or the mmpretrain
pipeline. Rounds alternate bare ``cv2.imdecode`` and the loader; the best of
each is reported. ``--samples-per-sec`` (per GPU, e.g. 5300 / 8) prints how
many workers keep up. See docs/data.md, "Choosing num_workers".
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config, DictAction

from mmpfc.benchmark.data_speed import PIPELINES, describe, measure_data_speed


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config with a RecordIO '
                        'train_dataloader (e.g. configs/_base_/datasets/'
                        'ms1mv3.py)')
    parser.add_argument('--data-root', default=None,
                        help="a folder of train.rec/.idx/property (default: "
                        'a synthetic set in a temporary folder)')
    parser.add_argument('--pipeline', default='config',
                        choices=['config', *PIPELINES],
                        help="the config's pipeline and collate (default), "
                        'or one of these')
    parser.add_argument('--num-images', type=int, default=6000,
                        help='images per round (and of the synthetic set)')
    parser.add_argument('--num-classes', type=int, default=3000,
                        help='identities of the synthetic set')
    parser.add_argument('--num-workers', type=int, default=1, choices=[0, 1],
                        help='1: one worker process (default); 0: the '
                        'loader in this process')
    parser.add_argument('--rounds', type=int, default=3,
                        help='rounds of decode + loader (best is reported)')
    parser.add_argument('--samples-per-sec', type=float, default=None,
                        help='samples/s one GPU trains at: print the '
                        'workers it needs')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        speed = measure_data_speed(
            cfg, osp.basename(args.config), args.pipeline, args.data_root,
            args.num_images, args.num_classes, args.num_workers, args.rounds,
            args.samples_per_sec, args.seed)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f'benchmark_data: {err}', file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dict(speed.to_dict(), command=' '.join(
            ['python tools/benchmark_data.py', *(argv or sys.argv[1:])]))))
    else:
        print(describe(speed))
    return 0


if __name__ == '__main__':
    sys.exit(main())
