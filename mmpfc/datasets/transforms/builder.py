"""Build pipelines in the mmpfc scope."""
from __future__ import annotations

from typing import Callable, Sequence

from mmpfc.registry import TRANSFORMS
from mmpfc.utils.compat import build_in_scope


def build_transforms(pipeline: Sequence[dict | Callable]) -> list[Callable]:
    """Transforms of ``pipeline`` built from the mmpfc registry.

    mmengine's ``Compose`` looks dicts up in the *current default scope*, so a
    dataset built outside a Runner (scripts, tests) would not find
    ``LoadImageFromBytes``; building here finds mmpfc names, plain mmcv
    names and scoped ones such as ``mmpretrain.PackInputs``.
    """
    return [build_in_scope(TRANSFORMS, t) for t in pipeline]
