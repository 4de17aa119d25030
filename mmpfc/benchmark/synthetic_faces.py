"""A RecordIO training set of synthetic face-like JPEGs, for measuring the
data pipeline without a real data set.

The images stand in for MS1MV3's as far as decoding is concerned: 112x112,
JPEG quality 95, about 8.8 KB each (a smooth face-like drawing per identity
plus per-image sensor-like noise; the noise sets the entropy and so the
size and the decoding time)."""
from __future__ import annotations

import os

import cv2
import numpy as np

from mmpfc.datasets.face_record_writer import FaceRecordWriter
from mmpfc.datasets.mx_face_dataset import write_property

IMAGE_SIZE = 112
JPEG_QUALITY = 95
#: noise standard deviation that gives ~8.8 KB per image at quality 95
NOISE_STD = 15.0


def identity_image(rng: np.random.Generator,
                   size: int = IMAGE_SIZE) -> np.ndarray:
    """A smooth (size, size, 3) uint8 drawing: background gradient, face
    ellipse, eyes and mouth, in colours and places drawn from ``rng``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    slope = rng.uniform(-0.6, 0.6, 2).astype(np.float32)
    img = rng.uniform(60, 200, 3).astype(np.float32) + \
        (xx * slope[0] + yy * slope[1])[..., None]
    s = size / 112
    cx, cy = (56 + rng.normal(0, 4)) * s, (60 + rng.normal(0, 4)) * s
    ax, ay = rng.uniform(30, 40) * s, rng.uniform(40, 50) * s
    face = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
    img[face] = img[face] * 0.6 + rng.uniform(120, 230, 3) * 0.4
    for dx in (-18, 18):
        cv2.circle(img, (int(cx + dx * s), int(cy - 12 * s)), int(6 * s),
                   (30, 30, 30), -1)
    cv2.ellipse(img, (int(cx), int(cy + 22 * s)), (int(14 * s), int(5 * s)),
                0, 0, 360, (60, 40, 120), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_synthetic_faces(out_dir: str, num_images: int, num_classes: int,
                          seed: int = 0, size: int = IMAGE_SIZE) -> dict:
    """Write ``train.rec``, ``train.idx`` and ``property`` of
    ``num_images`` JPEGs over ``num_classes`` identities (image ``i`` is of
    identity ``i * num_classes // num_images``: each identity's images one
    after the other, as insightface's identity records need) in its
    layout.

    Returns ``num_images``, ``num_classes`` and ``mean_bytes`` (the mean
    JPEG size).
    """
    if not 1 <= num_classes <= num_images:
        raise ValueError(f'num_classes={num_classes} must be in [1, '
                         f'num_images={num_images}]')
    rng = np.random.default_rng(seed)
    bases = [identity_image(rng, size).astype(np.int16)
             for _ in range(num_classes)]
    # per-image noise: windows of one pool (drawing it per image is slower
    # than encoding the image)
    pool = rng.normal(0, NOISE_STD, (4 * size, 4 * size, 3)).astype(np.int16)
    os.makedirs(out_dir, exist_ok=True)
    total = 0
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    with FaceRecordWriter(os.path.join(out_dir, 'train.rec'), num_images,
                          num_classes) as writer:
        for i in range(num_images):
            y, x = rng.integers(0, 3 * size, 2)
            label = i * num_classes // num_images
            img = bases[label] + pool[y:y + size, x:x + size]
            ok, data = cv2.imencode(
                '.jpg', np.clip(img, 0, 255).astype(np.uint8), params)
            assert ok, 'cv2.imencode failed on a synthetic image'
            writer.add(data.tobytes(), label)
            total += data.size
    write_property(os.path.join(out_dir, 'property'), num_classes, size,
                   size)
    return dict(num_images=num_images, num_classes=num_classes,
                mean_bytes=total / num_images)
