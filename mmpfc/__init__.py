"""mmpfc: Partial FC for large-scale face-recognition training on MMEngine.

Importing the package registers every component in the ``mmpfc`` scope and
silences the known, harmless third-party warnings listed in
:data:`mmpfc.utils.logging.KNOWN_WARNINGS` (narrow filters, each with its
reason; mmpretrain's import raises one of them).
"""
from .utils.logging import filter_known_warnings

filter_known_warnings()
from .utils import compat  # noqa: E402,F401  (library workarounds first)
from . import models  # noqa: E402,F401
from . import datasets  # noqa: E402,F401
from . import engine  # noqa: E402,F401
from . import evaluation  # noqa: E402,F401
from .version import __version__  # noqa: E402

__all__ = ['__version__']
