"""Build pipelines in the mmpfc scope."""
from __future__ import annotations

from typing import Callable, Sequence

from mmpfc.registry import TRANSFORMS


def build_transforms(pipeline: Sequence[dict | Callable]) -> list[Callable]:
    """Transforms of ``pipeline`` built from the mmpfc registry.

    mmengine's ``Compose`` looks dicts up in the *current default scope*, so a
    dataset built outside a Runner (scripts, tests) would not find
    ``LoadImageFromBytes``; building here finds mmpfc names, plain mmcv
    names and scoped ones such as ``mmpretrain.PackInputs``. Built
    transforms (callables) are kept as they are.
    """
    return [TRANSFORMS.build(t) if isinstance(t, dict) else t
            for t in pipeline]
