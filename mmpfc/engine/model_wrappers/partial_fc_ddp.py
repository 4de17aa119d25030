"""DDP that leaves rank-local (sharded) parameters alone."""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch.nn as nn
from mmengine.model import MMDistributedDataParallel
from torch.nn.parallel import DistributedDataParallel

from mmpfc.models.utils import sharded_names
from mmpfc.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class PartialFCDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for models with a sharded head.

    Stock DDP broadcasts every parameter from rank 0 when it wraps the model
    and all-reduces (averages) every gradient. Both are wrong for the rows of
    a ``PartialFCHead``: each rank owns different classes. This wrapper tells
    DDP to ignore every tensor marked with
    :func:`mmpfc.models.utils.mark_sharded` (they keep their rank-local values
    and gradients); everything else (the backbone) is replicated as usual.

    On a CPU model it passes ``device_ids=None`` (the Runner fills in
    ``[LOCAL_RANK]``, which CPU DDP rejects), so the same config runs with
    gloo on a machine without GPUs.

    Select it in the config (``configs/_base_/default_runtime.py`` does)::

        model_wrapper_cfg = dict(type='PartialFCDistributedDataParallel',
                                 broadcast_buffers=False,
                                 find_unused_parameters=False)

    Args:
        module: The model to wrap.
        device_ids: As DDP; replaced by ``None`` for a CPU model.
        **kwargs: Other arguments of ``MMDistributedDataParallel``.
    """

    def __init__(self,
                 module: nn.Module,
                 device_ids: Optional[Sequence[int]] = None,
                 detect_anomalous_params: bool = False,
                 **kwargs) -> None:
        ignore = set(getattr(module, '_ddp_params_and_buffers_to_ignore',
                             ()))
        ignore.update(sharded_names(module))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            module, sorted(ignore))
        if _on_cpu(module):
            device_ids = None
        if 'broadcast_buffers' in kwargs and _HAS_FORWARD_SYNC_BUFFERS:
            # torch >= 2.14 deprecates it; the replacement still syncs the
            # replicated buffers once at wrap time, which is what we want
            # (sharded ones are ignored above).
            kwargs.setdefault('forward_sync_buffers',
                              kwargs.pop('broadcast_buffers'))
        super().__init__(module=module, device_ids=device_ids,
                         detect_anomalous_params=detect_anomalous_params,
                         **kwargs)


_HAS_FORWARD_SYNC_BUFFERS = 'forward_sync_buffers' in inspect.signature(
    DistributedDataParallel.__init__).parameters


def _on_cpu(module: nn.Module) -> bool:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor is None or tensor.device.type == 'cpu'


__all__ = ['PartialFCDistributedDataParallel', 'sharded_names']
