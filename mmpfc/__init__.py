"""mmpfc: Partial FC for large-scale face-recognition training on MMEngine.

Importing the package registers every component in the ``mmpfc`` scope and
installs its process-wide settings with one call,
:func:`mmpfc.utils.process_hooks.install_process_hooks` (warning filters,
checkpoint globals for ``weights_only`` loading, the sampled-gradient guard
on torch optimizers); nothing else changes global state at import.
"""
from .utils.process_hooks import install_process_hooks

install_process_hooks()
from . import models  # noqa: E402,F401
from . import datasets  # noqa: E402,F401
from . import engine  # noqa: E402,F401
from . import evaluation  # noqa: E402,F401
from .version import __version__  # noqa: E402

__all__ = ['__version__']
