"""Face embeddings from a trained checkpoint, without a training set-up.

    from mmpfc.apis import init_recognizer, extract_embeddings
    model = init_recognizer('work_dirs/r50/iter_20000.pth')  # config inside
    emb = extract_embeddings(model, ['a.jpg', 'b.jpg'], flip=True)
    similarity = emb[0] @ emb[1]

This is the one inference path of mmpfc: the tools (IJB evaluation, ONNX
export) build their model with :func:`init_recognizer` and embed batches
with :func:`embed_batch`, so the backbone, the neck and the preprocessing are
those of training.
"""
from __future__ import annotations

import copy
import itertools
import os
import re
from typing import Iterable, List, Optional, Sequence, Tuple, Union

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
            converted file), or a bare state dict of the backbone (an
            insightface ``backbone.pth`` / ``model.pt``: keys without the
            ``backbone.`` prefix). Only the backbone / neck weights are
            read, so a sharded checkpoint needs none of its shard files
            here. Every backbone and neck weight must be in it: a model
            with a neck refuses a backbone-only file, naming the missing
            keys, rather than running with a random neck.
        config: Config (file, object or ``model`` dict); defaults to the
            config stored in the checkpoint by MMEngine.
        device: Where the model runs.

    Returns:
        A ``FaceRecognizer`` in eval mode without its classification head.
    """
    state, bare = None, False
    if checkpoint is not None:
        state = load_file(checkpoint, mmap=True)
        if not isinstance(state, dict):
            raise CheckpointError(f'checkpoint {checkpoint} holds a '
                                  f'{type(state).__name__}, not a dict of '
                                  'weights')
        if 'state_dict' not in state:
            bare = True
            state = dict(state_dict=_bare_state_dict(state))
    model_cfg = _model_config(config, state, checkpoint)
    model_cfg.pop('head', None)  # the class centers are for training only
    model = MODELS.build(model_cfg)
    if state is not None:
        weights = {k: v for k, v in state['state_dict'].items()
                   if not k.startswith('head.')}
        diff = compare_state_dicts(model.state_dict(), weights)
        if diff:
            hint = ''
            if bare and any(k.startswith('neck.') for k in diff.missing):
                hint = ('; a bare backbone state dict (such as insightface\'s '
                        'backbone.pth) holds no neck weights: give the '
                        'checkpoint of the whole model')
            raise CheckpointError(f'checkpoint {checkpoint} does not fit the '
                                  f'model: {diff.describe()}{hint}')
        model.load_state_dict(weights)
    return model.to(device).eval()


def _bare_state_dict(weights: dict) -> dict:
    """A bare state dict as the model's: one without any ``backbone.`` key
    is a backbone's (insightface's files; a ``module.`` prefix left by
    ``DistributedDataParallel`` is dropped) and gets the prefix."""
    if any(str(k).startswith('backbone.') for k in weights):
        return weights
    return {'backbone.' + re.sub(r'^module\.', '', str(k)): v
            for k, v in weights.items()}


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
def embed_batch(model: nn.Module,
                images: Sequence[ImageLike],
                flip: bool = False,
                normalize: bool = True,
                input_size: Optional[Tuple[int, int]] = INPUT_SIZE
                ) -> np.ndarray:
    """Embeddings of one batch of aligned faces, in one forward pass (two
    with ``flip``).

    Args:
        model: From :func:`init_recognizer`.
        images: Image paths or RGB ``uint8`` arrays (HxWx3 each, or an
            NxHxWx3 stack) of aligned faces; see :func:`extract_embeddings`.
        flip: Add the embedding of the horizontally flipped image to that
            of the image, before any normalization (the insightface
            verification protocol sums the raw embeddings).
        normalize: L2-normalize each row; ``False`` keeps the raw embedding
            (IJB evaluation weights images by its norm).
        input_size: ``(H, W)`` images are resized to (None: as they are).

    Returns:
        float32 array (N, D), the model's ``extract_feat(x)[-1]`` (backbone,
        then neck) of the preprocessed images.
    """
    arrays = [_as_rgb_array(image) for image in images]
    if not arrays:
        raise ValueError('embed_batch got no images; expected at least one')
    to_bgr = bool(getattr(model.data_preprocessor, 'to_rgb', False))
    device = next(model.parameters()).device
    inputs = _to_inputs(arrays, to_bgr, input_size)
    batch = model.data_preprocessor(dict(inputs=inputs), False)['inputs']
    batch = batch.to(device)
    emb = model.extract_feat(batch)[-1].float()
    if flip:
        emb = emb + model.extract_feat(batch.flip(3))[-1].float()
    if normalize:
        emb = F.normalize(emb, dim=1)
    return emb.cpu().numpy()


def extract_embeddings(model: nn.Module,
                       images: Union[ImageLike, Iterable[ImageLike]],
                       batch_size: int = 64,
                       flip: bool = False,
                       input_size: Optional[Tuple[int, int]] = INPUT_SIZE,
                       normalize: bool = True) -> np.ndarray:
    """Embeddings, one row per image, L2-normalized unless ``normalize`` is
    false.

    Args:
        model: From :func:`init_recognizer`.
        images: Image path(s) or RGB ``uint8`` array(s) (HxWx3, or an
            NxHxWx3 stack) of aligned faces, any iterable of them; they are
            read ``batch_size`` at a time. The model's data preprocessor
            scales them (to [-1, 1] for the default config). A missing
            file raises ``FileNotFoundError``, one that is not an image
            ``ValueError``; both name the path.
        batch_size: Images per forward pass.
        flip: Add the raw embedding of the horizontally flipped image
            before normalizing (the verification protocol).
        input_size: ``(H, W)`` images are resized to (None: as they are).
        normalize: ``False`` returns the raw (flip-summed) embeddings.

    Returns:
        float32 array (N, D); (0, 0) for no images.
    """
    if batch_size < 1:
        raise ValueError(f'batch_size={batch_size}; expected a positive '
                         'number of images per forward pass')
    if isinstance(images, (str, os.PathLike)) or (
            isinstance(images, np.ndarray) and images.ndim == 3):
        images = [images]
    remaining = iter(images)
    out = []
    while True:
        chunk = list(itertools.islice(remaining, batch_size))
        if not chunk:
            break
        out.append(embed_batch(model, chunk, flip, normalize, input_size))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
