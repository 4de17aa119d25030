"""Export a face model's embedding network to ONNX and check it.

    python tools/deploy/export_onnx.py work_dirs/r50/iter_20000.pth r50.onnx

Input ``input``: (N, 3, 112, 112) float32, RGB, scaled to [-1, 1]
(``(x / 255 - 0.5) / 0.5``), N dynamic. Output ``embedding``: (N, D),
un-normalized. The config comes from the checkpoint unless --config is
given. With onnxruntime installed, the export is compared with PyTorch on a
random batch and the max abs difference printed.
"""
import argparse
import sys

import torch

from mmpfc.apis import export_onnx, init_recognizer, onnx_max_abs_diff


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('checkpoint', help='mmpfc checkpoint')
    parser.add_argument('output', help='ONNX file to write')
    parser.add_argument('--config', help='config (default: from checkpoint)')
    parser.add_argument('--input-size', type=int, nargs=2,
                        default=[112, 112], metavar=('H', 'W'))
    parser.add_argument('--opset', type=int, default=17)
    parser.add_argument('--static-batch', action='store_true',
                        help='fix the batch size to 1')
    parser.add_argument('--no-verify', action='store_true',
                        help='skip the onnxruntime comparison')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = init_recognizer(args.checkpoint, args.config)
    export_onnx(model, args.output, tuple(args.input_size), args.opset,
                dynamic_batch=not args.static_batch)
    print(f'wrote {args.output}')
    if not args.no_verify:
        batch = 1 if args.static_batch else 4
        images = torch.rand(batch, 3, *args.input_size) * 2 - 1
        diff = onnx_max_abs_diff(model, args.output, images)
        print(f'onnxruntime vs PyTorch, batch {batch}: max abs diff '
              f'{diff:.3e}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
