"""Face embeddings from a trained checkpoint, without a training set-up.

    from mmpfc.apis import init_recognizer, extract_embeddings
    model = init_recognizer('work_dirs/r50/iter_20000.pth')  # config inside
    emb = extract_embeddings(model, ['a.jpg', 'b.jpg'], flip=True)
    similarity = emb[0] @ emb[1]
"""
from __future__ import annotations

import copy
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.config import Config

from mmpfc.checkpoint import CheckpointError, compare_state_dicts, load_file
from mmpfc.datasets.transforms.loading import read_image_file
from mmpfc.registry import MODELS

ImageLike = Union[str, os.PathLike, np.ndarray]
INPUT_SIZE = (112, 112)  # (height, width) of aligned faces


def init_recognizer(checkpoint: Optional[str] = None,
                    config: Union[str, Config, dict, None] = None,
                    device: str = 'cpu') -> nn.Module:
    """Build the embedding model (no head) and load its weights.

    Args:
        checkpoint: Any mmpfc checkpoint (sharded main file, merged or
            converted file). Only the backbone / neck weights are read, so a
            sharded checkpoint needs none of its shard files here.
        config: Config (file, object or ``model`` dict); defaults to the
            config stored in the checkpoint by MMEngine.
        device: Where the model runs.

    Returns:
        A ``FaceRecognizer`` in eval mode without its classification head.
    """
    state = None
    if checkpoint is not None:
        state = load_file(checkpoint, mmap=True)
        if not isinstance(state, dict):
            raise CheckpointError(f'checkpoint {checkpoint} holds a '
                                  f'{type(state).__name__}, not a dict of '
                                  'weights')
        if 'state_dict' not in state:
            state = dict(state_dict=state)
    model_cfg = _model_config(config, state, checkpoint)
    model_cfg.pop('head', None)  # the class centers are for training only
    model = MODELS.build(model_cfg)
    if state is not None:
        weights = {k: v for k, v in state['state_dict'].items()
                   if not k.startswith('head.')}
        diff = compare_state_dicts(model.state_dict(), weights)
        if diff:
            raise CheckpointError(f'checkpoint {checkpoint} does not fit the '
                                  f'model: {diff.describe()}')
        model.load_state_dict(weights)
    return model.to(device).eval()


def _model_config(config, state: Optional[dict], checkpoint) -> dict:
    if isinstance(config, str):
        config = Config.fromfile(config)
    elif config is None:
        text = (state or {}).get('meta', {}).get('cfg')
        if text is None:
            raise ValueError(f'checkpoint {checkpoint} stores no config; '
                             'pass config=')
        config = Config.fromstring(text, file_format='.py')
    model_cfg = config.get('model', config)
    return copy.deepcopy(dict(model_cfg))


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    """An RGB array of ``image``: a path is read and decoded (missing file:
    ``FileNotFoundError``; not an image: ``ValueError``, both naming it)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image_file(os.fspath(image), channel_order='rgb')
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f'expected an HxWx3 (or HxWx1) image, got shape '
                         f'{image.shape}')
    return image


def _to_inputs(images: List[np.ndarray], to_bgr: bool,
               size: Optional[Tuple[int, int]]) -> List[torch.Tensor]:
    import cv2
    inputs = []
    for image in images:
        if size is not None and image.shape[:2] != tuple(size):
            image = cv2.resize(image, tuple(size[::-1]),
                               interpolation=cv2.INTER_LINEAR)
            image = image.reshape(*size, -1)
        if to_bgr and image.shape[2] == 3:
            image = image[..., ::-1]
        inputs.append(torch.from_numpy(
            np.ascontiguousarray(image.transpose(2, 0, 1))))
    return inputs


@torch.no_grad()
def extract_embeddings(model: nn.Module,
                       images: Union[ImageLike, Sequence[ImageLike]],
                       batch_size: int = 64,
                       flip: bool = False,
                       input_size: Optional[Tuple[int, int]] = INPUT_SIZE
                       ) -> np.ndarray:
    """L2-normalized embeddings, one row per image.

    Args:
        model: From :func:`init_recognizer`.
        images: Image path(s) or RGB ``uint8`` array(s) (HxWx3, or an
            NxHxWx3 stack) of aligned faces. The model's data preprocessor
            scales them (to [-1, 1] for the default config). A missing
            file raises ``FileNotFoundError``, one that is not an image
            ``ValueError``; both name the path.
        batch_size: Images per forward pass.
        flip: Add the embedding of the horizontally flipped image before
            normalizing (the verification protocol).
        input_size: ``(H, W)`` images are resized to (None: as they are).

    Returns:
        float32 array (N, D) with unit-norm rows.
    """
    if isinstance(images, (str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    arrays = [_as_rgb_array(image) for image in images]
    to_bgr = bool(getattr(model.data_preprocessor, 'to_rgb', False))
    device = next(model.parameters()).device
    out = []
    for first in range(0, len(arrays), batch_size):
        inputs = _to_inputs(arrays[first:first + batch_size], to_bgr,
                            input_size)
        batch = model.data_preprocessor(dict(inputs=inputs), False)['inputs']
        batch = batch.to(device)
        emb = model.extract_feat(batch)[-1].float()
        if flip:
            emb = emb + model.extract_feat(batch.flip(3))[-1].float()
        out.append(F.normalize(emb, dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
