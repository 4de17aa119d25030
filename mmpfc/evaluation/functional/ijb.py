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
    ``meta/{t}_template_pair_label.txt`` (template1, template2, 0/1). A line
    of another layout, the two image lists differing, a label other than
    0/1 or a pair naming a template without images raises a ``ValueError``
    naming the file and the line or pair.
    """
    prefix = os.path.join(root, 'meta', target.lower())
    pts_path = f'{prefix}_name_5pts_score.txt'
    tid_path = f'{prefix}_face_tid_mid.txt'
    pts = _read_table(pts_path, [str] + [float] * 11,
                      'name, 10 landmark coordinates, score')
    tid_mid = _read_table(tid_path, [str, int, int],
                          'name, template id, media id')
    _check_same_images(pts_path, pts, tid_path, tid_mid)
    templates = np.array([row[1] for _, row in tid_mid], np.int64)
    pairs, labels = _read_pairs(f'{prefix}_template_pair_label.txt',
                                templates, tid_path)
    return dict(
        names=[row[0] for _, row in pts],
        landmarks=np.array([row[1:11] for _, row in pts],
                           np.float64).reshape(-1, 5, 2),
        scores=np.array([row[11] for _, row in pts], np.float64),
        templates=templates,
        medias=np.array([row[2] for _, row in tid_mid], np.int64),
        pairs=pairs, labels=labels)


def _read_table(path: str, types: Sequence[type],
                layout: str) -> list[tuple[int, tuple]]:
    """``(line number, typed fields)`` of each non-blank line of ``path``;
    a line with another number of fields, or a field its type refuses,
    raises naming the file, the line and the expected ``layout``."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != len(types):
                    raise ValueError
                rows.append((number, tuple(
                    kind(v) for kind, v in zip(types, fields))))
            except ValueError:
                raise ValueError(
                    f'{path}, line {number}: expected {len(types)} fields '
                    f'({layout}), got {line.strip()!r}') from None
    return rows


def _check_same_images(pts_path: str, pts: list, tid_path: str,
                       tid_mid: list) -> None:
    """Both meta files must list the same images in the same order (the
    features of one are matched to the templates of the other by row)."""
    for (pts_line, pts_row), (tid_line, tid_row) in zip(pts, tid_mid):
        if pts_row[0] != tid_row[0]:
            raise ValueError(
                f'{tid_path}, line {tid_line}: image {tid_row[0]!r}, but '
                f'{pts_path}, line {pts_line}, has {pts_row[0]!r}: both must '
                'list the same images in the same order')
    if len(pts) != len(tid_mid):
        raise ValueError(f'{tid_path} lists {len(tid_mid)} images, '
                         f'{pts_path} {len(pts)}: both must list the same '
                         'images in the same order')


def _read_pairs(path: str, templates: np.ndarray,
                tid_path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(pairs (P, 2), labels (P,) bool)`` of the pair file, parsed by
    numpy (IJB-C has 15M pairs); labels must be 0/1 and templates known."""
    try:
        table = np.loadtxt(path, np.int64, ndmin=2)
    except ValueError as err:
        raise ValueError(f'{path}: expected lines of 3 integers (template1, '
                         f'template2, label 0/1): {err}') from err
    if table.shape[1] != 3:
        raise ValueError(f'{path}: expected lines of 3 integers (template1, '
                         f'template2, label 0/1), got {table.shape[1]}')
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if len(bad):
        raise ValueError(f'{path}: pair {bad[0]} {table[bad[0]].tolist()} '
                         f'has label {table[bad[0], 2]}; expected 0 or 1')
    unknown = np.flatnonzero(~np.isin(table[:, :2], templates).all(axis=1))
    if len(unknown):
        row = table[unknown[0]].tolist()
        missing = row[0] if row[0] not in templates else row[1]
        raise ValueError(f'{path}: pair {unknown[0]} {row} names template '
                         f'{missing}, which has no image in {tid_path}')
    return table[:, :2], table[:, 2].astype(bool)


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
    unknown = np.flatnonzero(np.any(
        ids[np.minimum(index, len(ids) - 1)] != pairs, axis=1))
    if len(unknown):
        raise ValueError(f'pair {unknown[0]} {pairs[unknown[0]].tolist()} '
                         'names a template without images')
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
