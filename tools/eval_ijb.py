"""IJB-B / IJB-C 1:1 verification of an mmpfc model (insightface protocol).

Each loose crop is aligned from its 5 landmarks to the 112x112 ArcFace
template; its embedding is the raw embedding of the crop plus that of its
mirror (flip test), kept unnormalized (norm as quality) and weighted by the
detector score; templates average their media and sum them; a pair's score is
the cosine of its two templates. Prints TAR at FAR 1e-6..1e-1 and saves the
ROC as PNG (and the scores as .npy).

The model and its embeddings come from ``mmpfc.apis`` (``init_recognizer``,
``embed_batch``): the whole embedding network of the checkpoint (backbone and
neck, no head) with the config's data preprocessor.

    python tools/eval_ijb.py configs/pfc/CONFIG.py work_dirs/x/iter_N.pth \\
        --data-root data/IJB_release/IJBC --target IJBC --out-dir work_dirs/x
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from mmpfc.apis import embed_batch, init_recognizer
from mmpfc.datasets.transforms.loading import read_image_file
from mmpfc.evaluation.functional.ijb import (DEFAULT_FARS, align_face,
                                             pair_scores, read_ijb_meta,
                                             tar_at_far, template_features)
from mmpfc.evaluation.functional.verification import l2_normalize


class AlignedFaces(torch.utils.data.Dataset):
    """Loose crops aligned to 112x112 RGB, as (112, 112, 3) uint8 arrays."""

    def __init__(self, folder: str, names: list, landmarks: np.ndarray):
        self.folder, self.names, self.landmarks = folder, names, landmarks

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> np.ndarray:
        # a missing file or one that is not an image raises, naming the path
        img = read_image_file(os.path.join(self.folder, self.names[i]),
                              channel_order='rgb')
        return align_face(img, self.landmarks[i])


def extract(model: nn.Module, dataset: torch.utils.data.Dataset,
            batch_size: int, num_workers: int,
            flip: bool = True) -> np.ndarray:
    """Raw embedding of every aligned face of ``dataset`` (with ``flip``,
    plus that of its mirror), by :func:`mmpfc.apis.embed_batch`; the
    loader's workers read and align the crops."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         num_workers=num_workers)
    feats = [embed_batch(model, batch.numpy(), flip=flip, normalize=False)
             for batch in loader]
    return np.concatenate(feats)


def evaluate(meta: dict, feats: np.ndarray, norm_score: bool = True,
             detector_score: bool = True,
             fars: Sequence[float] = DEFAULT_FARS) -> tuple[dict, np.ndarray]:
    """``({far: tar}, pair scores)`` from the raw image embeddings
    ``feats`` (N, D) under the chosen protocol switches."""
    if not norm_score:
        feats = l2_normalize(feats)
    if detector_score:
        feats = feats * meta['scores'][:, None]
    ids, tfeats = template_features(feats, meta['templates'], meta['medias'])
    scores = pair_scores(ids, tfeats, meta['pairs'])
    return tar_at_far(meta['labels'], scores, fars), scores


def save_roc(path: str, labels: np.ndarray, scores: np.ndarray,
             name: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from mmpfc.evaluation.functional.ijb import roc_curve
    fpr, tpr, _ = roc_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.semilogx(np.maximum(fpr, 1e-7), tpr, label=name)
    ax.set(xlim=(1e-6, 1), ylim=(0, 1), xlabel='False Accept Rate',
           ylabel='True Accept Rate', title='ROC')
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right')
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)


def format_table(rows: dict, fars: Sequence[float]) -> str:
    head = 'method'.ljust(24) + ''.join(f'{far:>9.0e}' for far in fars)
    lines = [head] + [
        name.ljust(24) + ''.join(f'{100 * tars[far]:9.2f}' for far in fars)
        for name, tars in rows.items()
    ]
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='mmpfc model config')
    parser.add_argument('checkpoint', help='mmpfc checkpoint, or an '
                        'insightface backbone.pth for a model without neck')
    parser.add_argument('--data-root', required=True,
                        help='IJB_release/IJBC (or IJBB) folder')
    parser.add_argument('--target', default='IJBC', choices=['IJBB', 'IJBC'])
    parser.add_argument('--out-dir', default='.', help='PNG / .npy folder')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--num-workers', type=int, default=4)
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-flip', action='store_true',
                        help='skip the mirrored crops')
    parser.add_argument('--no-norm-score', action='store_true',
                        help='L2-normalize image embeddings before pooling')
    parser.add_argument('--no-detector-score', action='store_true',
                        help='do not weight images by detector score')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    meta = read_ijb_meta(args.data_root, args.target)
    model = init_recognizer(args.checkpoint, args.config, args.device)
    faces = AlignedFaces(os.path.join(args.data_root, 'loose_crop'),
                         meta['names'], meta['landmarks'])
    feats = extract(model, faces, args.batch_size, args.num_workers,
                    flip=not args.no_flip)
    tars, scores = evaluate(meta, feats, not args.no_norm_score,
                            not args.no_detector_score)
    name = os.path.splitext(os.path.basename(args.config))[0]
    print(f'{args.target} 1:1 verification, TAR (%) at FAR '
          f'({len(scores)} pairs, {len(feats)} images)')
    print(format_table({name: tars}, DEFAULT_FARS))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f'{args.target.lower()}_{name}')
    np.save(f'{stem}_scores.npy', scores)
    save_roc(f'{stem}_roc.png', meta['labels'], scores, name)
    return tars


if __name__ == '__main__':
    main()
