"""One training step of a config's model, as rank r of W virtual GPUs.

The step is ``BaseModel.train_step`` cut into its phases (the data
preprocessor and the forward under the optim wrapper's context, the
wrapper's backward, its ``step`` and ``zero_grad``), run ``steps`` times
so that the last one is a steady step (optimizer state allocated); the
last step's phases are named ``forward``, ``backward`` and ``step``, the
earlier ones ``warmup``. DDP is not wrapped: its gradient all-reduce of the
backbone is outside what this measures (docs/partial_fc.md lists it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict

from mmpfc.models.utils import is_sharded

from .virtual_gpu import VirtualGPU, virtual_rank

#: The input images of face configs: 3 x 112 x 112.
FACE_IMAGE = (3, 112, 112)


@dataclass
class VirtualStep:
    """What one rank's steady training step did on its virtual GPU."""
    rank: int
    world_size: int
    batch_size: int
    gpu: VirtualGPU
    #: bytes of the replicated parameters (fp32) and their element count
    param_bytes: int
    params: int
    #: elements of the largest replicated parameter
    largest_param: int


def _model_cfg(cfg: Union[Config, dict]) -> Tuple[dict, dict, int]:
    """``(model, optim_wrapper, batch)`` configs of a full config."""
    model = cfg['model']
    optim = cfg.get('optim_wrapper')
    if optim is None:
        raise ValueError('the config has no optim_wrapper: a training step '
                         'needs one')
    batch = cfg.get('train_dataloader', {}).get('batch_size', 128)
    return model, optim, batch


def _fake_batch(batch: int, image_shape: Sequence[int]) -> dict:
    from mmpretrain.structures import DataSample
    labels = torch.zeros(batch, dtype=torch.long)
    return dict(inputs=torch.empty(batch, *image_shape, dtype=torch.uint8),
                data_samples=[DataSample().set_gt_label(labels[i])
                              for i in range(batch)])


def build_on_virtual_gpu(model_cfg: Union[dict, ConfigDict]) -> nn.Module:
    """Build ``model_cfg`` in the mmpfc scope on the current virtual GPU
    (inside :func:`.virtual_rank`)."""
    from mmengine.registry import DefaultScope

    from mmpfc.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpfc'), \
            torch.device('cuda'):
        model = MODELS.build(model_cfg)
    preprocessor = getattr(model, 'data_preprocessor', None)
    if preprocessor is not None:  # the module is on CUDA already
        preprocessor.to('cuda')
    return model


def run_virtual_step(cfg: Union[Config, dict], rank: int, world_size: int,
                     batch_size: Optional[int] = None, steps: int = 2,
                     image_shape: Sequence[int] = FACE_IMAGE,
                     count_work: bool = False) -> VirtualStep:
    """Run ``steps`` training steps of ``cfg`` as rank ``rank`` of
    ``world_size`` virtual GPUs; ``batch_size`` per GPU (default: the
    config's train batch); ``count_work``: record every operator's work
    (:class:`.virtual_gpu.Work`)."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    model_cfg, optim_cfg, default_batch = _model_cfg(cfg)
    batch = batch_size or default_batch
    with virtual_rank(rank, world_size, count_work) as gpu:
        model = build_on_virtual_gpu(model_cfg)
        model.train()
        with DefaultScope.overwrite_default_scope('mmpfc'):
            wrapper = build_optim_wrapper(model, optim_cfg)
        replicated = [p for p in model.parameters() if not is_sharded(p)]
        for index in range(steps):
            last = index == steps - 1
            _train_step(model, wrapper, _fake_batch(batch, image_shape),
                        gpu, last)
    return VirtualStep(
        rank=rank, world_size=world_size, batch_size=batch, gpu=gpu,
        param_bytes=sum(p.numel() * p.element_size() for p in replicated),
        params=sum(p.numel() for p in replicated),
        largest_param=max((p.numel() for p in replicated), default=0))


def _train_step(model: nn.Module, wrapper, data: dict, gpu: VirtualGPU,
                last: bool) -> None:
    """``BaseModel.train_step`` in phases (see the module doc)."""
    names = ('forward', 'backward', 'step') if last else ('warmup', ) * 3
    with gpu.phase(names[0]):
        with wrapper.optim_context(model):
            data = model.data_preprocessor(data, True)
            losses = model._run_forward(data, mode='loss')
        loss = model.parse_losses(losses)[0]
        del losses
    with gpu.phase(names[1]):
        wrapper.backward(loss)
        del loss
    del data
    with gpu.phase(names[2]):
        wrapper.step()
        wrapper.zero_grad()
