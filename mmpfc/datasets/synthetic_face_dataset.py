"""Synthetic faces generated from the index: for benchmarks and demos."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mmpfc.registry import DATASETS
from mmpfc.utils.arg_checks import (PIPELINE, AnyOf, Bool, Int, Opt, Real, Seq,
                                    arg_specs)

from .transforms.builder import build_transforms


@DATASETS.register_module()
@arg_specs(num_classes=Int(low=1), num_samples=Int(low=1),
           image_size=AnyOf(Int(low=1), Seq(Int(low=1), length=2)),
           learnable=Bool(), noise_std=Real(low=0.0),
           prototype_grid=Int(low=1), bank_size=Int(low=1), seed=Int(),
           pipeline=Opt(PIPELINE))
class SyntheticFaceDataset(Dataset):
    """Random uint8 "faces" with labels spread over all identities.

    Nothing is stored per sample: item ``i`` has the label ``i % num_classes``
    and an image computed from ``(seed, i)``, so any length and any number of
    classes (millions) cost no memory, and every rank and worker sees the same
    data for the same index.

    Two modes:

    * ``learnable=False`` (benchmark): images come from a small bank of random
      images made once at construction, so a sample costs no more than an
      index lookup; data loading never limits a speed test. Unlike the
      reference's synthetic set (one image, one label), the labels cover every
      class, so the head's sampling and all-to-all traffic are realistic.
    * ``learnable=True`` (demo): each identity has a fixed prototype, a smooth
      colour pattern made from a ``3 x prototype_grid x prototype_grid``
      random grid (seeded by the label) upsampled to the image size, and each
      sample adds Gaussian noise (seeded by the index). A short run learns it
      and the loss clearly falls.

    Without a ``pipeline`` an item is already packed: ``inputs`` a
    ``(3, H, W)`` uint8 RGB tensor and ``data_samples`` a ``DataSample`` with
    ``gt_label``, what ``FaceRecognizer``'s preprocessor expects. With a
    ``pipeline`` the transforms get ``dict(img=HxWx3 uint8 RGB array,
    gt_label=int, img_shape=(H, W), ori_shape=(H, W), sample_idx=i)`` and
    must pack it (e.g. ``mmpretrain.RandomFlip``, then
    ``mmpretrain.PackInputs``).

    Example::

        train_dataloader = dict(
            batch_size=128, num_workers=2,
            sampler=dict(type='InfiniteSampler', shuffle=True),
            dataset=dict(type='SyntheticFaceDataset', num_classes=3000000,
                         num_samples=1000000))

    Args:
        num_classes: Number of identities C; labels are ``i % C``.
        num_samples: Length of the dataset.
        image_size: Image height and width (an int for square images).
        learnable: Prototype + noise images (see above) instead of a random
            image bank.
        noise_std: Std of the per-sample Gaussian noise in pixel units
            (learnable mode).
        prototype_grid: Side of the random grid that makes a prototype;
            smaller is smoother and easier to learn.
        bank_size: Number of random images of the benchmark mode.
        seed: Seed of every random draw.
        pipeline: Optional transforms (see above).
    """

    def __init__(self,
                 num_classes: int,
                 num_samples: int,
                 image_size: Union[int, Sequence[int]] = 112,
                 learnable: bool = False,
                 noise_std: float = 40.0,
                 prototype_grid: int = 4,
                 bank_size: int = 16,
                 seed: int = 0,
                 pipeline: Optional[Sequence[Union[dict, Callable]]] = None
                 ) -> None:
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        image_size = tuple(int(s) for s in image_size)
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.image_size: Tuple[int, int] = image_size
        self.learnable = learnable
        self.noise_std = float(noise_std)
        self.prototype_grid = int(prototype_grid)
        self.seed = int(seed)
        self.pipeline = build_transforms(pipeline) if pipeline else None
        self.metainfo = dict(dataset_type='synthetic',
                             num_classes=self.num_classes)
        self._bank = None
        if not learnable:
            gen = torch.Generator().manual_seed(self.seed)
            self._bank = torch.randint(0, 256, (bank_size, 3, *image_size),
                                       dtype=torch.uint8, generator=gen)

    def __len__(self) -> int:
        return self.num_samples

    def get_label(self, index: int) -> int:
        """Class id of item ``index``."""
        return index % self.num_classes

    def prototype(self, label: int) -> torch.Tensor:
        """(3, H, W) float prototype of identity ``label`` in [0, 255]."""
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + label) % 2**63)
        grid = torch.rand(1, 3, self.prototype_grid, self.prototype_grid,
                          generator=gen) * 255.0
        return F.interpolate(grid, size=self.image_size, mode='bilinear',
                             align_corners=False)[0]

    def get_image(self, index: int) -> torch.Tensor:
        """(3, H, W) uint8 RGB image of item ``index``."""
        if not self.learnable:
            return self._bank[index % self._bank.shape[0]].clone()
        gen = torch.Generator().manual_seed(
            (self.seed * 7_919 + index + 1) * 2_654_435_761 % 2**63)
        image = self.prototype(self.get_label(index))
        image += torch.randn(image.shape, generator=gen) * self.noise_std
        return image.clamp_(0, 255).to(torch.uint8)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} out of range for '
                             f'{self.num_samples} samples')
        label = self.get_label(index)
        image = self.get_image(index)
        if self.pipeline is not None:
            results = dict(img=np.ascontiguousarray(
                image.permute(1, 2, 0).numpy()), gt_label=label,
                img_shape=self.image_size, ori_shape=self.image_size,
                sample_idx=index)
            for transform in self.pipeline:
                results = transform(results)
            return results
        from mmpretrain.structures import DataSample
        sample = DataSample(metainfo=dict(sample_idx=index))
        return dict(inputs=image, data_samples=sample.set_gt_label(label))

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, '
                f'num_samples={self.num_samples}, image_size='
                f'{self.image_size}, learnable={self.learnable})')
