"""The insightface 1:1 verification protocol on embedding pairs, in numpy."""
from __future__ import annotations

import numpy as np

from mmpfc.utils.arg_checks import Flags, Int, arg_specs

#: distance thresholds of the protocol: 0, 0.01, ..., 3.99
DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)
#: how far from 1 the norm of an embedding :func:`evaluate_pairs` takes may
#: be (float16 rounding stays well inside)
UNIT_NORM_TOLERANCE = 1e-2


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@arg_specs(issame=Flags(), nrof_folds=Int(low=1))
def evaluate_pairs(emb1: np.ndarray,
                   emb2: np.ndarray,
                   issame: np.ndarray,
                   nrof_folds: int = 10,
                   thresholds: np.ndarray | None = None) -> dict:
    """Cross-validated verification accuracy of pairs ``(emb1[i], emb2[i])``.

    A pair is called "same" when the squared L2 distance of its embeddings is
    below a threshold. The pairs are cut into ``nrof_folds`` contiguous folds
    (no shuffle, the first ``P % nrof_folds`` folds one pair longer, like
    sklearn's ``KFold``); for each fold the threshold that is most accurate on
    the other folds (the first one on ties) is applied to it. With
    ``nrof_folds=1`` the threshold is chosen and scored on all pairs.

    The embeddings must be L2-normalized (the insightface protocol
    normalizes the flip-summed embedding first): the thresholds 0..3.99
    span the squared distances of unit vectors, and raw embeddings (norms
    of 10-30) would put every pair above all of them, scoring chance
    accuracy without any sign of the mistake. So a row whose norm is not 1
    (within ``UNIT_NORM_TOLERANCE``), or not finite, raises a
    ``ValueError`` naming it; normalize with :func:`l2_normalize`, whose
    zero rows (an all-zero embedding) are accepted as they are.

    Args:
        emb1, emb2 (np.ndarray): (P, D) embeddings of the two sides.
        issame (np.ndarray): (P,) bools (or 0/1 integers), ``True`` for a
            genuine pair; other dtypes raise (``'False'`` would be true).
        nrof_folds (int): Number of folds. Defaults to 10.
        thresholds (np.ndarray, optional): Candidate thresholds.

    Returns:
        dict: ``accuracy`` and ``accuracy_std`` (mean and population std of
        the fold accuracies, fractions), ``threshold`` (mean of the chosen
        thresholds), ``fold_accuracy`` and ``fold_threshold`` (per fold),
        ``tpr`` and ``fpr`` (per threshold, averaged over the test folds).
    """
    emb1, emb2, issame = _checked_pairs(emb1, emb2, issame, nrof_folds)
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(
        thresholds, dtype=np.float64)

    dist = np.sum(np.square(emb1 - emb2), axis=1)
    predicted = dist[None, :] < thresholds[:, None]  # (T, P)
    correct = predicted == issame[None, :]

    folds = np.array_split(np.arange(len(issame)), nrof_folds)
    fold_acc, fold_thr = np.zeros(nrof_folds), np.zeros(nrof_folds)
    tpr, fpr = np.zeros((2, nrof_folds, len(thresholds)))
    for k, test in enumerate(folds):
        train = np.ones(len(issame), bool)
        if nrof_folds > 1:
            train[test] = False
        best = int(np.argmax(correct[:, train].mean(axis=1)))
        fold_thr[k] = thresholds[best]
        fold_acc[k] = correct[best, test].mean()
        tpr[k], fpr[k] = _rates(predicted[:, test], issame[test])
    return dict(accuracy=float(fold_acc.mean()),
                accuracy_std=float(fold_acc.std()),
                threshold=float(fold_thr.mean()),
                fold_accuracy=fold_acc, fold_threshold=fold_thr,
                tpr=tpr.mean(axis=0), fpr=fpr.mean(axis=0))


def _checked_pairs(emb1, emb2, issame, nrof_folds: int):
    """``(emb1, emb2, issame)`` as float64 and bool arrays, checked against
    each other, the fold count and the unit-norm rule."""
    emb1 = np.asarray(emb1, dtype=np.float64)
    emb2 = np.asarray(emb2, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool).ravel()
    if emb1.shape != emb2.shape or emb1.ndim != 2:
        raise ValueError(f'emb1 {emb1.shape} and emb2 {emb2.shape} must be '
                         'two (P, D) arrays of the same shape')
    if len(issame) != len(emb1):
        raise ValueError(f'{len(issame)} issame flags for {len(emb1)} pairs')
    if nrof_folds > len(issame):  # >= 1: the arg spec
        raise ValueError(f'nrof_folds={nrof_folds} must lie in [1, number '
                         f'of pairs={len(issame)}]')
    _check_unit_rows('emb1', emb1)
    _check_unit_rows('emb2', emb2)
    return emb1, emb2, issame


def _check_unit_rows(name: str, emb: np.ndarray) -> None:
    """Refuse rows that are neither unit length nor zero (see
    :func:`evaluate_pairs` for why), naming the first and counting all."""
    norms = np.linalg.norm(emb, axis=1)
    bad = np.flatnonzero(~(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE)
                         & (norms != 0))
    if len(bad):
        raise ValueError(
            f'{name} row {bad[0]} has L2 norm {norms[bad[0]]:.4g} ({len(bad)} '
            f'of {len(norms)} rows are not unit length): evaluate_pairs '
            'expects L2-normalized embeddings, its thresholds 0..4 being '
            'squared distances of unit vectors; pass l2_normalize(emb)')


def _rates(predicted: np.ndarray, issame: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """True- and false-positive rates per threshold (0 for an empty class)."""
    pos, neg = issame.sum(), (~issame).sum()
    tp = (predicted & issame).sum(axis=1)
    fp = (predicted & ~issame).sum(axis=1)
    return tp / max(pos, 1), fp / max(neg, 1)
