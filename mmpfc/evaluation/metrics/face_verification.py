"""LFW / CFP-FP / AgeDB-30 accuracy as an MMEngine metric."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric

from mmpfc.registry import METRICS
from mmpfc.utils.arg_checks import Int, OneOf, Opt, Str, arg_specs

from ..functional.verification import evaluate_pairs, l2_normalize

_NEEDED = ('dataset_name', 'image_idx', 'is_same', 'flip')


@METRICS.register_module()
@arg_specs(nrof_folds=Int(low=1), feat_key=Str(empty=False),
           collect_device=OneOf('cpu', 'gpu'), prefix=Opt(Str()))
class FaceVerificationMetric(BaseMetric):
    """Pair accuracy of the insightface verification protocol.

    The protocol is that of ``test()`` in insightface's
    ``recognition/arcface_torch/eval/verification.py``: the *raw* embeddings
    of each image and of its mirror are summed, then L2-normalized
    (``embeddings_list[0] + embeddings_list[1]``, then
    ``sklearn.preprocessing.normalize``), and XNorm is the mean L2 norm of
    the raw embeddings, mirrors included. So the metric reads by default
    ``raw_feat``, the un-normalized embedding that ``PartialFCHead.predict``
    sets (a 1-D tensor). Reading the normalized ``pred_feat`` instead
    (``feat_key='pred_feat'``) gives XNorm 1, and its flip sum weights image
    and mirror equally, whatever their norms: another number than the
    protocol's.

    Besides the embedding it reads the keys that
    ``FaceVerificationDataset`` attaches: ``dataset_name``, ``image_idx``,
    ``is_same`` and ``flip``. Per set it sums each image's embedding with its
    mirror's, L2-normalizes, and runs :func:`evaluate_pairs` (squared L2,
    thresholds 0..3.99, 10 folds).

    Reports ``{set}/accuracy``, ``{set}/accuracy_std``, ``{set}/threshold``,
    ``{set}/xnorm`` for every set seen, and ``mean_accuracy`` over the sets
    (for ``save_best``); accuracies are fractions. Several sets can go
    through one ``ConcatDataset`` and one metric. ``prefix`` prepends
    ``{prefix}/`` to every key.

    Example::

        val_evaluator = dict(type='FaceVerificationMetric')
        default_hooks = dict(checkpoint=dict(
            type='CheckpointHook', save_best='mean_accuracy', rule='greater'))

    Args:
        nrof_folds (int): Cross-validation folds. Defaults to 10.
        feat_key (str): Data-sample field of the raw embedding. Defaults
            to ``'raw_feat'``.
        collect_device (str): ``'cpu'`` or ``'gpu'``, for distributed runs.
        prefix (str, optional): Prefix of the metric names.
    """

    # keys start with the set names unless a prefix is given ('' rather
    # than None: mmengine warns about a metric without prefix)
    default_prefix = ''

    def __init__(self,
                 nrof_folds: int = 10,
                 feat_key: str = 'raw_feat',
                 collect_device: str = 'cpu',
                 prefix: str | None = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.nrof_folds = nrof_folds
        self.feat_key = feat_key

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            missing = [k for k in (self.feat_key, ) + _NEEDED
                       if sample.get(k) is None]
            if missing:
                raise KeyError(
                    f'FaceVerificationMetric needs {missing} in each data '
                    'sample: use FaceVerificationDataset and pack '
                    "meta_keys=VERIFICATION_META_KEYS; the model's predict "
                    f'must set {self.feat_key!r}')
            feat = sample[self.feat_key]
            if isinstance(feat, torch.Tensor):
                feat = feat.detach().float().cpu().numpy()
            self.results.append(
                (sample['dataset_name'], int(sample['image_idx']),
                 bool(sample['flip']), bool(sample['is_same']),
                 np.asarray(feat, np.float32).ravel()))

    def compute_metrics(self, results: list) -> dict:
        by_set = defaultdict(list)
        for item in results:
            by_set[item[0]].append(item[1:])
        metrics = {}
        for name in sorted(by_set):
            out = self.evaluate_set(name, by_set[name])
            metrics.update({f'{name}/{k}': v for k, v in out.items()})
        metrics['mean_accuracy'] = float(
            np.mean([metrics[f'{name}/accuracy'] for name in by_set]))
        return metrics

    def evaluate_set(self, name: str, items: list) -> dict:
        """Metrics of one set from its (image_idx, flip, is_same, feat)."""
        num_images = 1 + max(item[0] for item in items)
        flipped = any(item[1] for item in items)
        expected = num_images * (2 if flipped else 1)
        seen = {(item[0], item[1]) for item in items}
        if num_images % 2 or len(seen) != expected or len(items) != expected:
            raise ValueError(
                f'{name}: got {len(items)} embeddings ({len(seen)} distinct) '
                f'for {num_images} images, flip={flipped}; expected each '
                f'image {"and its mirror " if flipped else ""}exactly once '
                '(a subset of the set, or duplicated samples?)')
        dim = len(items[0][3])
        feats = np.zeros((2 if flipped else 1, num_images, dim), np.float64)
        issame = np.zeros(num_images // 2, bool)
        for image_idx, flip, is_same, feat in items:
            feats[int(flip), image_idx] = feat
            issame[image_idx // 2] = is_same
        self._check_finite(name, feats)
        xnorm = float(np.linalg.norm(feats, axis=2).mean())
        emb = l2_normalize(feats.sum(axis=0))
        out = evaluate_pairs(emb[0::2], emb[1::2], issame, self.nrof_folds)
        return dict(accuracy=out['accuracy'],
                    accuracy_std=out['accuracy_std'],
                    threshold=out['threshold'], xnorm=xnorm)

    @staticmethod
    def _check_finite(name: str, feats: np.ndarray) -> None:
        """Name the first NaN / inf embedding of set ``name``: it would
        otherwise surface in :func:`evaluate_pairs` as a bad pair row."""
        finite = np.isfinite(feats).all(axis=2)  # (flip, image)
        if not finite.all():
            flip, image = np.argwhere(~finite)[0]
            raise ValueError(
                f'{name}: the embedding of image {image}'
                f'{" (mirrored)" if flip else ""} is not finite '
                f'({int((~finite).sum())} of {finite.size} embeddings): did '
                'the model diverge?')
