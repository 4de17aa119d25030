"""A learnable synthetic identity problem and its held-out verification pairs.

Identity ``k`` of a universe (a seed) is a smooth random grey image: a
``grid x grid`` array of standard normal values, seeded by ``(seed, k)``,
upsampled bilinearly to the image size. A sample of the identity is that
image after per-sample variation, so the model has to learn an embedding
invariant to it, and close identities overlap:

* *appearance*: the grid plus Gaussian jitter (``jitter_std``, in grid
  units) before upsampling, so two samples of one identity differ in shape
  and not only in pixels;
* *pose*: a random rotation, scale and shift (``grid_sample``);
* *photometry*: random contrast and brightness, then pixel noise;
* *occlusion*: with probability ``occlusion_p`` a random rectangle of
  uniform grey;
* *flip*: training samples are mirrored with probability 0.5 (as
  insightface trains); evaluation images are not, the protocol adds the
  mirrored image's embedding.

Training uses identities ``[0, num_classes)``; evaluation pairs are built
from identities ``[num_classes, num_classes + num_eval_identities)``, never
seen in training (open set, as LFW).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmpfc.registry import DATASETS
from mmpfc.utils.arg_checks import Int, Real, arg_specs

_AMOUNT = Real(low=0.0)  # a std, an angle or a fraction of variation


@DATASETS.register_module()
@arg_specs(num_classes=Int(low=1), num_samples=Int(low=1),
           identity_offset=Int(low=0), image_size=Int(low=8),
           grid=Int(low=1), jitter_std=_AMOUNT, rotate_deg=_AMOUNT,
           scale=_AMOUNT, shift=_AMOUNT, contrast=_AMOUNT,
           brightness=_AMOUNT, noise_std=_AMOUNT, occlusion_p=Real(0.0, 1.0),
           seed=Int())
class SyntheticIdentityDataset(Dataset):
    """Samples of ``num_classes`` synthetic identities (see the module doc).

    Item ``i`` has label ``i % num_classes`` and is rendered with a
    generator seeded by ``(seed, i)``: the same on every rank and worker.
    ``inputs`` is a ``(1, H, W)`` uint8 tensor, as ``FaceRecognizer``'s
    preprocessor expects (configure it with ``mean=[127.5], std=[127.5]``).
    The benchmark draws whole batches with :meth:`sample_batch` instead.

    Args:
        num_classes: Training identities C; labels are ``0 .. C-1``.
        num_samples: Length of the dataset (item access only).
        identity_offset: Identity id of label 0 in the universe (held-out
            sets use ``num_classes`` of the training set).
        image_size: Side of the square grey images.
        grid: Side of the random grid of an identity (its dimension is
            ``grid ** 2``; smaller is smoother and easier).
        jitter_std: Per-sample Gaussian jitter of the grid.
        rotate_deg, scale, shift: Pose range: rotation in +-degrees,
            scale in ``1 +- scale``, shift in +- pixels.
        contrast, brightness: Contrast in ``1 +- contrast``, brightness
            in +- pixel values.
        noise_std: Pixel noise std (pixel values).
        occlusion_p: Probability of an occluding rectangle (side 1/5 to
            2/5 of the image).
        seed: Seed of the identity universe and of item rendering.
    """

    def __init__(self,
                 num_classes: int,
                 num_samples: int = 100_000,
                 identity_offset: int = 0,
                 image_size: int = 32,
                 grid: int = 6,
                 jitter_std: float = 0.5,
                 rotate_deg: float = 10.0,
                 scale: float = 0.1,
                 shift: float = 2.0,
                 contrast: float = 0.3,
                 brightness: float = 20.0,
                 noise_std: float = 20.0,
                 occlusion_p: float = 0.3,
                 seed: int = 0) -> None:
        self.num_classes, self.num_samples = int(num_classes), int(
            num_samples)
        self.identity_offset, self.image_size = int(identity_offset), int(
            image_size)
        self.grid, self.jitter_std = int(grid), float(jitter_std)
        self.rotate_deg, self.scale, self.shift = rotate_deg, scale, shift
        self.contrast, self.brightness = contrast, brightness
        self.noise_std, self.occlusion_p = noise_std, occlusion_p
        self.seed = int(seed)
        self.metainfo = dict(dataset_type='synthetic_identity',
                             num_classes=self.num_classes)
        self._grids: Optional[torch.Tensor] = None

    # ------------------------------------------------------- identities
    @property
    def identities(self) -> range:
        """Universe ids of this set's identities (label ``l`` is
        ``identity_offset + l``)."""
        return range(self.identity_offset,
                     self.identity_offset + self.num_classes)

    def identity_grid(self, identity: int) -> torch.Tensor:
        """``(grid, grid)`` latent of universe identity ``identity``."""
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + identity * 7_919 + 17) % 2**63)
        return torch.randn(self.grid, self.grid, generator=gen)

    @property
    def grids(self) -> torch.Tensor:
        """``(C, grid, grid)`` latents of all labels (made once)."""
        if self._grids is None:
            self._grids = torch.stack(
                [self.identity_grid(k) for k in self.identities])
        return self._grids

    # -------------------------------------------------------- rendering
    def render(self, labels: torch.Tensor, generator: torch.Generator,
               flip: bool = True) -> torch.Tensor:
        """``(N, 1, H, W)`` uint8 samples of ``labels`` (see the module doc);
        ``flip``: mirror each with probability 0.5."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) and not (0 <= int(labels.min())
                                and int(labels.max()) < self.num_classes):
            raise ValueError(f'labels must lie in [0, {self.num_classes}), '
                             f'got {int(labels.min())}..{int(labels.max())}')
        n, size = len(labels), self.image_size

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, generator=generator)

        grids = self.grids[labels] + self.jitter_std * torch.randn(
            n, self.grid, self.grid, generator=generator)
        image = F.interpolate(grids[:, None], size=(size, size),
                              mode='bilinear', align_corners=False)
        angle = uniform(-1, 1) * math.radians(self.rotate_deg)
        zoom = 1.0 / uniform(1 - self.scale, 1 + self.scale)
        # affine_grid works in [-1, 1] units: one pixel is 2 / size
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (
            2 * self.shift / size)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                             torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
        image = F.grid_sample(image, grid, padding_mode='border',
                              align_corners=False)
        if flip:
            mirror = torch.rand(n, generator=generator) < 0.5
            image[mirror] = image[mirror].flip(3)
        gain = uniform(1 - self.contrast, 1 + self.contrast)
        offset = uniform(-self.brightness, self.brightness)
        image = 127.5 + 50.0 * gain[:, None, None, None] * image \
            + offset[:, None, None, None]
        image += self.noise_std * torch.randn(image.shape,
                                              generator=generator)
        self._occlude(image, generator)
        return image.round_().clamp_(0, 255).to(torch.uint8)

    def _occlude(self, image: torch.Tensor,
                 generator: torch.Generator) -> None:
        """In place: a uniform grey rectangle on some images."""
        n, size = image.shape[0], self.image_size
        hit = torch.rand(n, generator=generator) < self.occlusion_p
        sides = torch.randint(size // 5, 2 * size // 5 + 1, (n, 2),
                              generator=generator)
        corners = (torch.rand(n, 2, generator=generator)
                   * (size - sides + 1)).long()
        grey = torch.rand(n, generator=generator) * 255
        pos = torch.arange(size)
        rows = (pos >= corners[:, :1]) & (pos < corners[:, :1] + sides[:, :1])
        cols = (pos >= corners[:, 1:]) & (pos < corners[:, 1:] + sides[:, 1:])
        mask = (rows[:, :, None] & cols[:, None, :]) & hit[:, None, None]
        image[:, 0] = torch.where(mask, grey[:, None, None], image[:, 0])

    def sample_batch(self, batch_size: int, generator: torch.Generator
                     ) -> tuple:
        """``(images, labels)``: ``batch_size`` uniform random labels and
        their rendered (flipped at random) samples."""
        labels = torch.randint(0, self.num_classes, (batch_size, ),
                               generator=generator)
        return self.render(labels, generator), labels

    # ---------------------------------------------------- Dataset API
    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for '
                             f'{self.num_samples} samples')
        from mmpretrain.structures import DataSample
        label = index % self.num_classes
        gen = torch.Generator().manual_seed(
            (self.seed * 2_654_435_761 + index + 1) % 2**63)
        image = self.render(torch.tensor([label]), gen)[0]
        sample = DataSample(metainfo=dict(sample_idx=index))
        return dict(inputs=image, data_samples=sample.set_gt_label(label))


def held_out(train: SyntheticIdentityDataset,
             num_identities: int) -> SyntheticIdentityDataset:
    """The ``num_identities`` identities that follow ``train``'s in its
    universe (same seed and variation): disjoint from the training ones."""
    if num_identities < 2:
        raise ValueError(f'num_identities must be >= 2 (a different pair '
                         f'needs two), got {num_identities!r}')
    keys = ('image_size', 'grid', 'jitter_std', 'rotate_deg', 'scale',
            'shift', 'contrast', 'brightness', 'noise_std', 'occlusion_p',
            'seed')
    return SyntheticIdentityDataset(
        num_classes=num_identities,
        identity_offset=train.identity_offset + train.num_classes,
        **{key: getattr(train, key) for key in keys})


@dataclass
class VerificationPairs:
    """Pairs in the layout of insightface's ``.bin`` sets.

    Attributes:
        images: ``(2P, 1, H, W)`` uint8; pair ``p`` is images ``2p`` and
            ``2p + 1``.
        identities: ``(2P,)`` universe identity of each image.
        issame: ``(P,)`` bool, ``True`` for a genuine pair.
    """
    images: torch.Tensor
    identities: torch.Tensor
    issame: torch.Tensor

    def __len__(self) -> int:
        return len(self.issame)


def build_pairs(identities: SyntheticIdentityDataset, num_pairs: int,
                seed: int) -> VerificationPairs:
    """``num_pairs`` pairs of ``identities`` (use :func:`held_out`), half
    genuine and half impostor, in a random order (the protocol's folds are
    contiguous, so each fold gets both kinds); images without flip."""
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f'num_pairs must be an even number >= 2 (half '
                         f'same, half different), got {num_pairs!r}')
    gen = torch.Generator().manual_seed((seed * 6_364_136_223 + 11) % 2**63)
    count = identities.num_classes
    issame = torch.zeros(num_pairs, dtype=torch.bool)
    issame[torch.randperm(num_pairs, generator=gen)[:num_pairs // 2]] = True
    first = torch.randint(0, count, (num_pairs, ), generator=gen)
    other = (first + torch.randint(1, count, (num_pairs, ), generator=gen)
             ) % count  # never the same identity
    second = torch.where(issame, first, other)
    labels = torch.stack([first, second], 1).reshape(-1)
    images = identities.render(labels, gen, flip=False)
    return VerificationPairs(images=images,
                             identities=labels + identities.identity_offset,
                             issame=issame)
