"""mmpfc: Partial FC for large-scale face-recognition training on MMEngine.

Importing the package registers every component in the ``mmpfc`` scope.
"""
from .utils import compat  # noqa: F401  (library workarounds first)
from . import models  # noqa: F401
from . import datasets  # noqa: F401
from . import engine  # noqa: F401
from . import evaluation  # noqa: F401
from .version import __version__

__all__ = ['__version__']
