"""Import checkpoints written by insightface ``arcface_torch``.

insightface writes the backbone once (``backbone.pth`` in older versions,
``model.pt`` in newer ones: a bare state dict of the backbone) and one file
per rank for the sharded centers: ``softmax_fc_gpu_{rank}.pt`` (the state dict
of its PartialFC module) or, when training with ``resume``,
``checkpoint_gpu_{rank}.pt`` (a dict with ``state_dict_backbone``,
``state_dict_softmax_fc``, ``state_optimizer``...). Its shards use the same
split as mmpfc (``shard_range``), so concatenating them in rank order gives
the (C, D) centers in class order. The optimizer state is not imported.
"""
from __future__ import annotations

import os
import os.path as osp
import re
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from mmpfc.models.utils import shard_range

from .io import CheckpointError, atomic_save, load_file, refuse_existing
from .manifest import Manifest, ParamEntry, set_manifest

BACKBONE_NAMES = ('model.pt', 'backbone.pth')
_SHARD_FILE = re.compile(
    r'^(?P<kind>softmax_fc_gpu|checkpoint_gpu)_(?P<rank>\d+)\.pt$')
# PartialFC module state-dict entries holding the centers, by version:
# v2 ``weight`` (a Parameter); v1 ``weight`` (buffer, sample_rate < 1) or
# ``weight_activated`` (sample_rate == 1).
_CENTER_KEYS = ('weight', 'weight_activated')


class InsightfaceFiles(NamedTuple):
    """The files of one insightface run: backbone and per-rank shards."""
    backbone: Optional[str]
    shards: List[str]  # rank order


def find_insightface_files(inputs: Sequence[str]) -> InsightfaceFiles:
    """Sort ``inputs`` (files, or folders to scan) into backbone and shards.

    Refuses mixed shard kinds, several backbones, and gaps in the ranks
    (naming the missing files).
    """
    files = []
    for item in inputs:
        if osp.isdir(item):
            files += [osp.join(item, n) for n in sorted(os.listdir(item))
                      if n in BACKBONE_NAMES or _SHARD_FILE.match(n)]
        elif osp.isfile(item):
            files.append(item)
        else:
            raise CheckpointError(f'{item} does not exist')
    backbones = [f for f in files if osp.basename(f) in BACKBONE_NAMES]
    shards: Dict[int, str] = {}
    kinds = set()
    for path in files:
        match = _SHARD_FILE.match(osp.basename(path))
        if match:
            kinds.add(match['kind'])
            shards[int(match['rank'])] = path
        elif path not in backbones:
            raise CheckpointError(
                f'{path}: not an insightface file name (expected one of '
                f'{BACKBONE_NAMES}, softmax_fc_gpu_<rank>.pt or '
                'checkpoint_gpu_<rank>.pt)')
    if len(kinds) > 1:
        raise CheckpointError(f'shards of both kinds given: {sorted(kinds)}; '
                              'give one kind')
    if len(backbones) > 1:
        raise CheckpointError(f'several backbone files given: {backbones}')
    if shards:
        kind = kinds.pop()
        missing = [f'{kind}_{r}.pt' for r in range(max(shards) + 1)
                   if r not in shards]
        if missing:
            raise CheckpointError(
                f'shard files missing: {", ".join(missing)} (give the files '
                'of every rank)')
    return InsightfaceFiles(backbones[0] if backbones else None,
                            [shards[r] for r in sorted(shards)])


def _centers(path: str, content) -> torch.Tensor:
    if isinstance(content, dict) and 'state_dict_softmax_fc' in content:
        content = content['state_dict_softmax_fc']
    if torch.is_tensor(content):
        return content
    for key in _CENTER_KEYS:
        value = content.get(key) if isinstance(content, dict) else None
        if torch.is_tensor(value) and value.dim() == 2 and value.numel():
            return value
    keys = list(content) if isinstance(content, dict) else type(content)
    raise CheckpointError(f'{path} holds no class centers (looked for '
                          f'{_CENTER_KEYS}; found {keys})')


def convert_insightface(files: InsightfaceFiles,
                        dst: str,
                        backbone_prefix: str = 'backbone.',
                        head_key: str = 'head.weight',
                        num_classes: Optional[int] = None,
                        overwrite: bool = False) -> dict:
    """Write an mmpfc checkpoint (for ``load_from``) from insightface files.

    The backbone's keys get ``backbone_prefix``; the centers of all ranks,
    concatenated in class order, go to ``head_key`` with an ``inline``
    manifest, so the file loads on any number of ranks.

    Args:
        files: From :func:`find_insightface_files`.
        dst: Output file; refused if it exists unless ``overwrite``.
        num_classes: If given, the shards must add up to it (catches a
            missing last rank, which file names cannot reveal).

    Returns:
        Summary: number of backbone tensors, ``(C, D)`` of the head, ranks.
    """
    refuse_existing(dst, overwrite)
    state_dict = {backbone_prefix + re.sub(r'^module\.', '', k): v
                  for k, v in _load_backbone(files).items()}
    summary = dict(backbone_tensors=len(state_dict), head=None,
                   world_size=len(files.shards))
    meta = dict(converted_from=[f for f in (files.backbone, *files.shards)
                                if f])
    converted = dict(meta=meta, state_dict=state_dict)
    if files.shards:
        centers = _load_centers(files.shards, num_classes)
        state_dict[head_key] = centers
        set_manifest(converted, Manifest.inline(
            {head_key: ParamEntry.of_matrix(centers)}))
        summary['head'] = tuple(int(n) for n in centers.shape)
    atomic_save(converted, dst, sidecar=True)
    return summary


def _load_backbone(files: InsightfaceFiles) -> dict:
    """The backbone's state dict: ``backbone.pth`` / ``model.pt``, or the
    one inside rank 0's ``checkpoint_gpu_0.pt``."""
    backbone = None
    if files.backbone is not None:
        backbone = load_file(files.backbone, 'insightface backbone')
    elif files.shards and osp.basename(files.shards[0]).startswith(
            'checkpoint_gpu'):
        backbone = load_file(files.shards[0], 'insightface checkpoint').get(
            'state_dict_backbone')
    if backbone is None:
        raise CheckpointError('no backbone: give backbone.pth / model.pt or '
                              'checkpoint_gpu_<rank>.pt files')
    return backbone


def _load_centers(shards: Sequence[str],
                  num_classes: Optional[int]) -> torch.Tensor:
    """The (C, D) centers of every rank's file in class order; the files
    must hold the rows :func:`shard_range` gives each rank."""
    parts = [_centers(p, load_file(p, f'insightface shard {r}'))
             for r, p in enumerate(shards)]
    total, world_size = sum(len(p) for p in parts), len(parts)
    if num_classes is not None and total != num_classes:
        raise CheckpointError(
            f'the {world_size} shards hold {total} classes, not '
            f'num_classes={num_classes}: shard files are missing')
    for rank, part in enumerate(parts):
        expected = shard_range(total, rank, world_size).num_local
        if len(part) != expected or part.shape[1] != parts[0].shape[1]:
            raise CheckpointError(
                f'{shards[rank]} holds {tuple(part.shape)}; rank '
                f'{rank} of {world_size} should hold {expected} rows of '
                f'size {parts[0].shape[1]} (a shard file is missing or '
                'from another run)')
    return torch.cat(parts)
