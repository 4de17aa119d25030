"""DDP that leaves rank-local (sharded) parameters alone."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn as nn
from mmengine.model import MMDistributedDataParallel

from mmpfc.models.utils import sharded_names
from mmpfc.registry import MODEL_WRAPPERS
from mmpfc.utils.arg_checks import Bool, Instance, Int, Opt, Seq, arg_specs
from mmpfc.utils.compat import ddp_arguments, ddp_ignore


@MODEL_WRAPPERS.register_module()
@arg_specs(module=Instance(nn.Module), device_ids=Opt(Seq(Int(low=0))),
           detect_anomalous_params=Bool())
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
        ddp_ignore(module, ignore | set(sharded_names(module)))
        device_ids, kwargs = ddp_arguments(module, device_ids, kwargs)
        super().__init__(module=module, device_ids=device_ids,
                         detect_anomalous_params=detect_anomalous_params,
                         **kwargs)


__all__ = ['PartialFCDistributedDataParallel', 'sharded_names']
