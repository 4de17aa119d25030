"""Convert insightface ``arcface_torch`` files into an mmpfc checkpoint.

    # backbone only (then load it with init_cfg=dict(type='Pretrained', ...))
    python tools/model_converters/insightface2mmpfc.py model.pt r50.pth
    # backbone and the centers of every rank (a folder, or the files)
    python tools/model_converters/insightface2mmpfc.py work_dirs/ms1mv3_r50 \
        r50_ms1mv3.pth --num-classes 93431

Files recognised: ``backbone.pth`` / ``model.pt`` (backbone state dict),
``softmax_fc_gpu_<rank>.pt`` or ``checkpoint_gpu_<rank>.pt`` (one per rank;
give all of them). The output loads with ``load_from`` on any number of
ranks; see docs/checkpoints.md.
"""
import argparse
import sys

from mmpfc.checkpoint import CheckpointError
from mmpfc.checkpoint.insightface import (convert_insightface,
                                          find_insightface_files)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('inputs', nargs='+',
                        help='insightface files or folders holding them')
    parser.add_argument('output', help='mmpfc checkpoint to write')
    parser.add_argument('--num-classes', type=int,
                        help='check that the shards hold this many classes')
    parser.add_argument('--backbone-prefix', default='backbone.',
                        help='prefix of the backbone keys in the model')
    parser.add_argument('--head-key', default='head.weight',
                        help='state-dict key of the class centers')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace OUTPUT if it exists')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        files = find_insightface_files(args.inputs)
        summary = convert_insightface(
            files, args.output, args.backbone_prefix, args.head_key,
            args.num_classes, args.overwrite)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'backbone: {files.backbone or files.shards[0]} '
          f'({summary["backbone_tensors"]} tensors)')
    if summary['head'] is None:
        print('no class centers given: load the backbone with '
              "init_cfg=dict(type='Pretrained', checkpoint=..., "
              "prefix='backbone.') in the backbone config")
    else:
        classes, dim = summary['head']
        print(f'{args.head_key}: {classes} x {dim} from '
              f'{summary["world_size"]} rank file(s)')
    print(f'wrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
