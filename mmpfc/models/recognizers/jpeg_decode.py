"""Decode a batch of encoded images on the model's device.

On CUDA the batch goes to nvJPEG in one call
(``torchvision.io.decode_jpeg(list, device='cuda')``); that call fails as a
whole when one image is something nvJPEG cannot decode (a CMYK or
progressive JPEG, a PNG), so then each image is tried alone and the ones
that fail are decoded on the CPU (OpenCV, as the CPU pipeline does) and
copied over, counted in :attr:`JpegDecoder.fallbacks`. On the CPU the batch
is decoded with OpenCV. Bytes no decoder reads raise a ``ValueError``
naming the file and key they came from.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional

import numpy as np
import torch
from mmengine.logging import print_log

from mmpfc.datasets.transforms.loading import decode_image

#: (list of 1-D uint8 CPU tensors, device) -> list of (3, H, W) uint8
#: tensors on the device, or an exception for the whole list.
DeviceDecode = Callable[[List[torch.Tensor], torch.device],
                        List[torch.Tensor]]


def nvjpeg_decode(images: List[torch.Tensor],
                  device: torch.device) -> List[torch.Tensor]:
    """torchvision's batched decode into RGB on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():  # torchvision >= 0.29: "use TorchCodec"
        warnings.filterwarnings('ignore', message='.*TorchCodec.*')
        return decode_jpeg(images, mode=ImageReadMode.RGB, device=device)


class JpegDecoder:
    """Decodes :class:`mmpfc.datasets.EncodedBatch` es into one (B, 3, H, W)
    uint8 tensor on the device, flipped where the batch says.

    Args:
        device_decode: the batched device decoder (tests pass one that
            fails for chosen images).
    """

    def __init__(self, device_decode: Optional[DeviceDecode] = None) -> None:
        self.device_decode = device_decode or nvjpeg_decode
        self.fallbacks = 0

    def __call__(self, batch, device: torch.device) -> torch.Tensor:
        images = batch.images()
        if device.type != 'cpu':
            decoded = self._on_device(images, batch.sources, device)
        else:
            decoded = [self._on_cpu(data, source) for data, source in
                       zip(images, batch.sources)]
        shapes = {tuple(img.shape) for img in decoded}
        if len(shapes) > 1:
            first = tuple(decoded[0].shape)
            odd = next(i for i, img in enumerate(decoded)
                       if tuple(img.shape) != first)
            raise ValueError(
                f'{batch.sources[odd]}: decoded to shape '
                f'{tuple(decoded[odd].shape)}, {batch.sources[0]} to '
                f'{first}: the images of a batch must have one size')
        stacked = torch.stack(decoded)
        flip = batch.flip.to(device, non_blocking=True).view(-1, 1, 1, 1)
        return torch.where(flip, stacked.flip(-1), stacked)

    def _on_device(self, images: List[torch.Tensor], sources: List[str],
                   device: torch.device) -> List[torch.Tensor]:
        try:
            return list(self.device_decode(images, device))
        except RuntimeError:
            pass  # one image or more it cannot read: find them
        decoded, failed = [], []
        for data, source in zip(images, sources):
            try:
                decoded.append(self.device_decode([data], device)[0])
            except RuntimeError:
                decoded.append(self._on_cpu(data, source).to(device))
                failed.append(source)
        if failed:
            self.fallbacks += len(failed)
            print_log(f'JpegDecoder: {len(failed)} image(s) of the batch '
                      f'decoded on the CPU instead ({self.fallbacks} so '
                      f'far), e.g. {failed[0]}', logger='current', level=30)
        return decoded

    @staticmethod
    def _on_cpu(data: torch.Tensor, source: str) -> torch.Tensor:
        img = decode_image(data.numpy(), source)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
