"""mmpfc: Partial FC for large-scale face-recognition training on MMEngine.

Importing the package registers every component in the ``mmpfc`` scope and
changes nothing else in the process: no torch setting, hook or warning
filter outlives the import (mmpretrain's known import-time notice is
ignored for the import only:
:func:`mmpfc.utils.logging.ignoring_known_warnings`).
"""
from .utils.logging import ignoring_known_warnings

with ignoring_known_warnings():
    from . import models  # noqa: F401
    from . import datasets  # noqa: F401
    from . import engine  # noqa: F401
    from . import evaluation  # noqa: F401
from .version import __version__  # noqa: E402

__all__ = ['__version__']
