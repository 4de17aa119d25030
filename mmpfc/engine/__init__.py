from . import optimizers  # noqa: F401
from . import hooks, model_wrappers, runners  # noqa: F401
