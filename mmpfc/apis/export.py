"""Export the embedding network (backbone + neck) to ONNX."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn as nn

from mmpfc.utils.compat import ONNX_EXPORT_KWARGS


class EmbeddingNet(nn.Module):
    """``model.extract_feat(x)[-1]``: normalized image in, embedding out.

    The data preprocessor is not part of it: inputs are RGB, (N, 3, H, W),
    already scaled to [-1, 1] (``(x / 255 - 0.5) / 0.5``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.extract_feat(images)[-1]


def export_onnx(model: nn.Module,
                path: str,
                input_size: Tuple[int, int] = (112, 112),
                opset: int = 17,
                dynamic_batch: bool = True) -> None:
    """Write ``model``'s embedding network to ``path``.

    Input ``input`` (N, 3, H, W) float32 in [-1, 1], output ``embedding``
    (N, D) un-normalized (L2-normalize it before comparing faces); ``N`` is
    dynamic unless ``dynamic_batch=False`` (then 1).
    """
    import onnx
    net = EmbeddingNet(model).eval()
    dummy = torch.zeros(1, 3, *input_size)
    axes = {'input': {0: 'batch'}, 'embedding': {0: 'batch'}} \
        if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(net, (dummy, ), path, input_names=['input'],
                          output_names=['embedding'], dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True,
                          **ONNX_EXPORT_KWARGS)
    onnx.checker.check_model(onnx.load(path))


def onnx_max_abs_diff(model: nn.Module, path: str,
                      images: torch.Tensor) -> float:
    """Largest |onnxruntime - PyTorch| over the embeddings of ``images``."""
    import onnxruntime
    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    got = session.run(['embedding'], {'input': images.numpy()})[0]
    with torch.no_grad():
        expected = EmbeddingNet(model).eval()(images).numpy()
    return float(np.abs(got - expected).max())
