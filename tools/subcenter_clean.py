"""List the likely noisy training samples of a sub-center ArcFace model.

The cleaning step of sub-center ArcFace (Deng et al., ECCV 2020): after
training with K sub-centers per class, most of a class's clean samples
gather around one sub-center, the dominant one; noisy samples (wrong
labels) end up closer to another sub-center, or far from the dominant one.
This tool embeds every training sample, takes per class the sub-center
closest to the most samples as dominant, and lists the samples

* closer to a non-dominant sub-center of their class (``non_dominant``), or
* farther than ``--threshold`` degrees from the dominant one (``far``; the
  paper uses 75 degrees).

    python tools/subcenter_clean.py CONFIG CHECKPOINT --out noisy.json
    python tools/subcenter_clean.py CONFIG CHECKPOINT --list train.txt \\
        --out noisy.txt --threshold 75

CHECKPOINT is a sharded main file (its shard files next to it), a merged
one or a converted one: the backbone and neck come from
:func:`mmpfc.apis.init_recognizer`, the (C, K*D) head weight from
:class:`mmpfc.checkpoint.CheckpointRows`, K and D from the config's head
(``num_subcenters``, ``in_channels``; K = 1 is allowed: only the threshold
applies then).

Samples: by default the config's ``train_dataloader.dataset``, in dataset
order, with the random transforms of its pipeline (types starting with
``Random``) left out, preprocessed by the model's data preprocessor as in
training. ``--list FILE`` instead reads ``path label`` lines (the
``ann_file`` format of ``FaceImageFolder``; relative paths are relative to
the list's folder), images used at their size, embedded by
:func:`mmpfc.apis.extract_embeddings`.

Output: ``.txt`` gives one flagged sample per line, ``id label reason
angle`` (``id`` the path, else the dataset index), tab-separated; any other
name gives JSON with the settings, per class the dominant sub-center (-1
for a class without samples) and the number of samples nearest to each
sub-center, and the flagged samples with their nearest sub-center and angle
to the dominant one.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from mmpfc.apis import extract_embeddings, init_recognizer
from mmpfc.checkpoint import CheckpointError, CheckpointRows, load_file

#: The paper's angle beyond which a sample is far from its dominant center.
DEFAULT_THRESHOLD = 75.0


def head_config(cfg: Config) -> Tuple[int, int, int]:
    """(C, K, D) of the config's head."""
    head = cfg.model.get('head')
    if not head:
        raise ValueError('the config has no model.head')
    return (int(head['num_classes']), int(head.get('num_subcenters', 1)),
            int(head['in_channels']))


def load_subcenters(checkpoint: str, num_classes: int, subcenters: int,
                    dim: int, key: str = 'head.weight') -> torch.Tensor:
    """The (C, K, D) sub-centers, normalized, fp32, from any checkpoint
    layout (rows are read by class id)."""
    source = CheckpointRows(checkpoint, load_file(checkpoint, mmap=True))
    entry = source.entry(key)
    if entry is None:
        raise CheckpointError(f'checkpoint {checkpoint} has no {key!r}')
    found = (entry.num_classes, entry.embedding_size)
    if found != (num_classes, subcenters * dim):
        raise CheckpointError(
            f'{key!r} of {checkpoint} is {found[0]} x {found[1]}; the '
            f'config asks for {num_classes} classes of {subcenters} '
            f'sub-center(s) of size {dim} ({num_classes} x '
            f'{subcenters * dim})')
    weight = source.take(key, 0, num_classes)[0].float()
    return F.normalize(weight.view(num_classes, subcenters, dim), dim=2)


def without_random_transforms(pipeline: Sequence) -> List:
    """``pipeline`` less its random augmentations: every sample is seen
    once, as it is."""
    kept = []
    for step in pipeline:
        kind = step.get('type', '') if isinstance(step, dict) else ''
        name = kind.rsplit('.', 1)[-1] if isinstance(kind, str) else ''
        if not name.startswith('Random'):
            kept.append(step)
    return kept


def dataset_cosines(model: nn.Module, cfg: Config, centers: torch.Tensor,
                    batch_size: int, workers: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, List]:
    """(N,) labels, (N, K) cosines to the label's sub-centers and N ids of
    the config's training set, in dataset order."""
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    from mmpfc.registry import DATASETS
    init_default_scope(cfg.get('default_scope', 'mmpfc'))
    dataset_cfg = dict(cfg.train_dataloader.dataset)
    if 'pipeline' in dataset_cfg:
        dataset_cfg['pipeline'] = without_random_transforms(
            dataset_cfg['pipeline'])
    # the config's collate, as MMEngine's Runner builds it (the lean
    # pipeline's face_collate packs the images the pipeline leaves
    # unpacked); the dataset in order
    loader = Runner.build_dataloader(dict(
        dataset=DATASETS.build(dataset_cfg), batch_size=batch_size,
        num_workers=workers,
        sampler=dict(type='DefaultSampler', shuffle=False),
        collate_fn=copy.deepcopy(cfg.train_dataloader.get(
            'collate_fn', dict(type='pseudo_collate')))))
    device = next(model.parameters()).device
    labels, cosines, ids = [], [], []
    with torch.no_grad():
        for data in loader:
            data = model.data_preprocessor(data, False)
            emb = model.extract_feat(data['inputs'])[-1].float()
            label = torch.cat([torch.as_tensor(s.gt_label).reshape(-1)
                               for s in data['data_samples']]).long()
            cosines.append(_cosines(emb.to(device), label, centers))
            labels.append(label.cpu())
            for sample in data['data_samples']:
                meta = sample.metainfo
                ids.append(meta.get('img_path'))
    # the path where the dataset gives one, else the position in it
    ids = [pos if i is None else i for pos, i in enumerate(ids)]
    return _cat(labels, torch.long), _cat(cosines, torch.float), ids


def list_cosines(model: nn.Module, list_file: str, centers: torch.Tensor,
                 batch_size: int) -> Tuple[torch.Tensor, torch.Tensor, List]:
    """The same for the ``path label`` lines of ``list_file``."""
    root = os.path.dirname(os.path.abspath(list_file))
    paths, labels = [], []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or not parts[1].lstrip('-').isdigit():
                raise ValueError(f'{list_file}, line {number}: {line!r} is '
                                 'not "path label"')
            paths.append(os.path.join(root, parts[0].strip()))
            labels.append(int(parts[1]))
    label = torch.tensor(labels, dtype=torch.long)
    if not paths:
        return label, torch.zeros(0, centers.shape[1]), []
    with torch.no_grad():
        emb = torch.from_numpy(extract_embeddings(
            model, paths, batch_size=batch_size, input_size=None))
    return label, _cosines(emb, label, centers), paths


def _cosines(emb: torch.Tensor, label: torch.Tensor,
             centers: torch.Tensor) -> torch.Tensor:
    """(B, K) cosines of each embedding to its own class's sub-centers."""
    if label.numel() and (label.min() < 0 or label.max() >= len(centers)):
        raise ValueError(f'labels must be in [0, {len(centers)}), got '
                         f'{int(label.min())}..{int(label.max())}')
    own = centers[label.to(centers.device)]  # (B, K, D)
    emb = F.normalize(emb.to(own), dim=1)
    return torch.einsum('bkd,bd->bk', own, emb).cpu()


def _cat(parts: List[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def find_noisy(labels: torch.Tensor, cosines: torch.Tensor,
               num_classes: int, threshold: float = DEFAULT_THRESHOLD
               ) -> Dict[str, object]:
    """Dominant sub-center per class and the flagged samples.

    Args:
        labels: (N,) class ids.
        cosines: (N, K) cosine of each sample to its class's sub-centers.
        num_classes: C.
        threshold: Degrees; a sample farther from its class's dominant
            sub-center is flagged.

    Returns:
        ``dominant`` (C,) (-1: no samples), ``counts`` (C, K) samples
        nearest to each sub-center, and per flagged sample (``index``, in
        sample order): its ``nearest`` sub-center, the ``angle`` to the
        dominant one in degrees and the ``reason``.
    """
    subcenters = cosines.shape[1]
    nearest = cosines.argmax(dim=1)
    counts = torch.zeros(num_classes * subcenters, dtype=torch.long)
    counts.index_add_(0, labels * subcenters + nearest,
                      torch.ones_like(labels))
    counts = counts.view(num_classes, subcenters)
    # most samples; ties go to the lowest sub-center
    dominant = counts.argmax(dim=1)
    dominant[counts.sum(dim=1) == 0] = -1
    own = dominant[labels]
    to_dominant = cosines.gather(1, own.clamp_min(0)[:, None]).squeeze(1)
    angle = torch.rad2deg(torch.acos(to_dominant.clamp(-1.0, 1.0)))
    non_dominant = nearest != own
    far = angle > threshold
    index = torch.nonzero(non_dominant | far).flatten()
    reason = ['non_dominant' if non_dominant[i] else 'far'
              for i in index.tolist()]
    return dict(dominant=dominant, counts=counts, index=index,
                nearest=nearest[index], angle=angle[index], reason=reason)


def write_report(path: str, result: dict, ids: List, labels: torch.Tensor,
                 settings: dict) -> None:
    """``.txt``: one flagged sample per line; otherwise JSON."""
    rows = [dict(index=int(i), id=ids[int(i)], label=int(labels[i]),
                 nearest=int(k), dominant=int(result['dominant'][labels[i]]),
                 angle=round(float(a), 4), reason=r)
            for i, k, a, r in zip(result['index'], result['nearest'],
                                  result['angle'], result['reason'])]
    with open(path, 'w') as f:
        if path.endswith('.txt'):
            f.write('# id\tlabel\treason\tangle_to_dominant_deg\n')
            for row in rows:
                f.write(f"{row['id']}\t{row['label']}\t{row['reason']}\t"
                        f"{row['angle']:.2f}\n")
            return
        json.dump(dict(settings, num_samples=len(ids),
                       num_flagged=len(rows),
                       dominant=result['dominant'].tolist(),
                       counts=result['counts'].tolist(), flagged=rows),
                  f, indent=1)
        f.write('\n')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', help='training config of the model')
    parser.add_argument('checkpoint', help='its checkpoint (any layout)')
    parser.add_argument('--out', default='subcenter_noisy.json',
                        help='report file: .txt for a list, else JSON')
    parser.add_argument('--threshold', type=float, default=DEFAULT_THRESHOLD,
                        help='flag samples farther than this many degrees '
                        'from the dominant sub-center (default: %(default)s)')
    parser.add_argument('--list', help='"path label" lines to check instead '
                        'of the config\'s training set')
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--workers', type=int, default=0,
                        help='dataloader workers (training set only)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--head-key', default='head.weight')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not 0.0 <= args.threshold <= 180.0:
        print(f'error: --threshold {args.threshold} is not an angle in '
              '[0, 180] degrees', file=sys.stderr)
        return 1
    cfg = Config.fromfile(args.config)
    try:
        num_classes, subcenters, dim = head_config(cfg)
        centers = load_subcenters(args.checkpoint, num_classes, subcenters,
                                  dim, args.head_key).to(args.device)
        model = init_recognizer(args.checkpoint, cfg, device=args.device)
        if args.list:
            labels, cosines, ids = list_cosines(model, args.list, centers,
                                                args.batch_size)
        else:
            labels, cosines, ids = dataset_cosines(
                model, cfg, centers, args.batch_size, args.workers)
    except (CheckpointError, ValueError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    result = find_noisy(labels, cosines, num_classes, args.threshold)
    settings = dict(config=args.config, checkpoint=args.checkpoint,
                    num_subcenters=subcenters, threshold_deg=args.threshold,
                    samples=args.list or 'train_dataloader.dataset')
    write_report(args.out, result, ids, labels, settings)
    flagged = len(result['reason'])
    share = flagged / max(1, len(ids))
    print(f'{flagged} of {len(ids)} samples flagged ({100 * share:.2f}%: '
          f"{result['reason'].count('non_dominant')} nearer a non-dominant "
          f'sub-center, {result["reason"].count("far")} beyond '
          f'{args.threshold:g} degrees); wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
