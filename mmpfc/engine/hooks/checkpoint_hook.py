"""MMEngine's ``CheckpointHook``, deleting old checkpoints only once the new
one is saved.

MMEngine (0.10.7, ``CheckpointHook._save_checkpoint_with_step`` and
``_save_best_checkpoint``) removes the checkpoint that ``max_keep_ckpts``
rotates out, and the previous best one (``save_best``), *before* it writes
the new file. A crash or ``kill -9`` inside that save then leaves no
complete checkpoint at all when ``max_keep_ckpts=1``, and no best
checkpoint with ``save_best``:
``last_checkpoint`` still names the file just deleted. Here the removals
MMEngine asks for are held back and carried out after the save returned
(and, for the rotation, after ``last_checkpoint`` names the new file), so a
crash at any point leaves the previous checkpoints in place. A best
checkpoint that a resumed run's message hub names in another folder is
never deleted (MMEngine would delete another run's best checkpoint once
this run beats its score). Everything else is MMEngine's hook; registered
in the mmpfc scope under the same name, it is what
``default_hooks.checkpoint=dict(type='CheckpointHook')`` builds there.
"""
from __future__ import annotations

import os.path as osp
from typing import Any, List

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook as MMEngineCheckpointHook

from mmpfc.checkpoint import remove_stale_shard_dirs
from mmpfc.registry import HOOKS


class _HeldRemovals:
    """A file backend whose ``remove`` / ``rmtree`` only note the path;
    everything else is the wrapped backend's."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.paths: List[str] = []

    def remove(self, path: str) -> None:
        self.paths.append(path)

    def rmtree(self, path: str) -> None:
        self.paths.append(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@HOOKS.register_module(name='CheckpointHook')
class CheckpointHook(MMEngineCheckpointHook):
    """``mmengine.hooks.CheckpointHook`` that removes the checkpoints it
    replaces after saving the new one (see the module doc)."""

    def before_train(self, runner) -> None:
        """MMEngine's, then the best checkpoints a resumed message hub names
        taken as this folder's: one in another folder (the run resumed
        another run's checkpoint, or a copied work dir names the original)
        is not this run's to delete when its score is beaten; a file of
        the same name here (the copy's own) is."""
        super().before_train(runner)
        if not self.save_best:
            return
        self.best_ckpt_path = self._own(getattr(self, 'best_ckpt_path', None))
        paths = getattr(self, 'best_ckpt_path_dict', {})  # several metrics
        for key, path in list(paths.items()):
            paths[key] = self._own(path)

    def _own(self, path):
        if not path or osp.realpath(osp.dirname(path)) == osp.realpath(
                self.out_dir):
            return path
        local = osp.join(self.out_dir, osp.basename(path))
        return local if osp.exists(local) else None

    def _save_checkpoint_with_step(self, runner, step, meta):
        self._holding_removals(super()._save_checkpoint_with_step, runner,
                               step, meta)

    def _save_best_checkpoint(self, runner, metrics) -> None:
        self._holding_removals(super()._save_best_checkpoint, runner,
                               metrics)

    def _holding_removals(self, save, *args) -> None:
        if isinstance(self.file_backend, _HeldRemovals):  # nested: outer
            save(*args)  # call removes once everything is saved
            return
        backend = self.file_backend
        held = self.file_backend = _HeldRemovals(backend)
        try:
            save(*args)
        finally:
            self.file_backend = backend
        if not is_main_process():
            return
        for path in held.paths:  # only reached when the save succeeded
            if backend.isfile(path):
                backend.remove(path)
            elif backend.isdir(path):
                backend.rmtree(path)
        # their shard folders and checksum files, which the save itself
        # removes only for main files already gone when it ran
        for folder in dict.fromkeys(osp.dirname(p) for p in held.paths):
            if osp.isdir(folder):
                remove_stale_shard_dirs(folder)
