"""Everything importing mmpfc changes in the process, in one call.

``import mmpfc`` calls :func:`install_process_hooks` once; nothing else in
the package changes global state at import time.
"""
from __future__ import annotations

_installed = False


def install_process_hooks() -> None:
    """Install mmpfc's process-wide settings (idempotent):

    1. narrow filters for known, harmless third-party warnings
       (:data:`mmpfc.utils.logging.KNOWN_WARNINGS`), before mmpretrain's
       import raises one of them;
    2. MMEngine's checkpoint globals allow-listed for
       ``torch.load(weights_only=True)``
       (:func:`mmpfc.utils.compat.allow_mmengine_checkpoint_globals`), so
       ``--resume`` works on torch >= 2.6;
    3. a post-step hook on every torch optimizer that raises when a sampled
       head's center gradients were left unapplied (the optimizer was
       driven by a wrapper that does not know them, and the centers would
       silently never learn).
    """
    global _installed
    if _installed:
        return
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from .compat import allow_mmengine_checkpoint_globals
    from .logging import filter_known_warnings
    filter_known_warnings()
    allow_mmengine_checkpoint_globals()
    from mmpfc.engine.optimizers.partial_fc_optim_wrapper import \
        refuse_unapplied_sampled_gradients
    register_optimizer_step_post_hook(refuse_unapplied_sampled_gradients)
    _installed = True
