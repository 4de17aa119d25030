"""IJB-B / IJB-C 1:1 verification: alignment, templates, ROC (numpy only)."""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from .verification import l2_normalize

#: where the 5 landmarks (eyes, nose tip, mouth corners) sit in a 112x112
#: crop: the insightface/ArcFace alignment target
ARCFACE_LANDMARKS = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 least-squares similarity (rotation, uniform scale, shift) that
    maps points ``src`` onto ``dst`` (Umeyama 1991, no reflection)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (s * sign).sum() / (src_c**2).sum(1).mean()
    shift = dst_mean - scale * rot @ src_mean
    return np.hstack([scale * rot, shift[:, None]])


def align_face(img: np.ndarray, landmarks: np.ndarray,
               size: int = 112) -> np.ndarray:
    """Warp ``img`` so its 5 ``landmarks`` land on the ArcFace template."""
    matrix = similarity_transform(np.reshape(landmarks, (5, 2)),
                                  ARCFACE_LANDMARKS * size / 112)
    return cv2.warpAffine(img, matrix, (size, size), borderValue=0.0)


def read_ijb_meta(root: str, target: str = 'IJBC') -> dict:
    """Images, landmarks, detector scores, templates, media and pairs.

    ``root`` is insightface's ``IJB_release/IJBC`` (or ``IJBB``) folder:
    ``meta/{t}_name_5pts_score.txt`` (name, 10 landmark coordinates, score),
    ``meta/{t}_face_tid_mid.txt`` (name, template, media, same order) and
    ``meta/{t}_template_pair_label.txt`` (template1, template2, 0/1).
    """
    prefix = os.path.join(root, 'meta', target.lower())
    rows = [line.split() for line in open(f'{prefix}_name_5pts_score.txt')
            if line.strip()]
    bad = [r for r in rows if len(r) != 12]
    if bad:
        raise ValueError(f'{prefix}_name_5pts_score.txt: expected 12 fields '
                         f'(name, 10 coordinates, score), got {bad[0]}')
    tid_mid = [line.split() for line in open(f'{prefix}_face_tid_mid.txt')
               if line.strip()]
    names = [r[0] for r in rows]
    if [r[0] for r in tid_mid] != names:
        raise ValueError(f'{prefix}_face_tid_mid.txt does not list the images '
                         'of the 5pts file in the same order')
    pairs = np.loadtxt(f'{prefix}_template_pair_label.txt', np.int64,
                       ndmin=2)
    return dict(
        names=names,
        landmarks=np.array([r[1:11] for r in rows], np.float64).reshape(
            -1, 5, 2),
        scores=np.array([r[11] for r in rows], np.float64),
        templates=np.array([r[1] for r in tid_mid], np.int64),
        medias=np.array([r[2] for r in tid_mid], np.int64),
        pairs=pairs[:, :2], labels=pairs[:, 2].astype(bool))


def template_features(img_feats: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids, L2-normalized template features)``.

    Images of one media (video frames) are averaged first so a long video
    does not outweigh a photo; a template is the sum of its media.
    """
    ids, t_index = np.unique(templates, return_inverse=True)
    groups, g_index = np.unique(np.stack([t_index, medias], 1), axis=0,
                                return_inverse=True)
    g_index = g_index.ravel()
    sums = np.zeros((len(groups), img_feats.shape[1]))
    np.add.at(sums, g_index, img_feats)
    media = sums / np.bincount(g_index)[:, None]
    feats = np.zeros((len(ids), img_feats.shape[1]))
    np.add.at(feats, groups[:, 0], media)
    return ids, l2_normalize(feats)


def pair_scores(ids: np.ndarray, feats: np.ndarray, pairs: np.ndarray,
                chunk: int = 100000) -> np.ndarray:
    """Cosine similarity of every template pair (rows of ``pairs``)."""
    index = np.searchsorted(ids, pairs)
    if np.any(ids[np.minimum(index, len(ids) - 1)] != pairs):
        raise ValueError('a pair names a template without images')
    return np.concatenate([
        np.einsum('ij,ij->i', feats[index[s:s + chunk, 0]],
                  feats[index[s:s + chunk, 1]])
        for s in range(0, len(pairs), chunk)
    ])


def roc_curve(labels: np.ndarray, scores: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` at every distinct score, from (0, 0)."""
    labels = np.asarray(labels, bool)
    order = np.argsort(-np.asarray(scores), kind='stable')
    sorted_scores, hits = np.asarray(scores)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(hits) - 1]
    tps, fps = np.cumsum(hits)[last], np.cumsum(~hits)[last]
    pos, neg = max(labels.sum(), 1), max((~labels).sum(), 1)
    return (np.r_[0.0, fps / neg], np.r_[0.0, tps / pos],
            np.r_[np.inf, sorted_scores[last]])


def tar_at_far(labels: np.ndarray, scores: np.ndarray,
               fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """Best true accept rate whose false accept rate does not exceed each
    target FAR.

    insightface instead reads the ROC point nearest the target, which may lie
    above it and, among points of equal FAR, takes the lowest TAR, so the
    two can differ slightly.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    best = np.maximum.accumulate(tpr)  # fpr is non-decreasing
    return {far: float(best[np.searchsorted(fpr, far, 'right') - 1])
            for far in fars}
