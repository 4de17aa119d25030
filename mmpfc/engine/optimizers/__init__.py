from .partial_fc_optim_wrapper import (PartialFCAmpOptimWrapper,
                                       PartialFCOptimWrapper)
from .sparse_adam import sparse_adam_step
from .sparse_sgd import sparse_sgd_step
from .sparse_step import sparse_step

__all__ = ['PartialFCOptimWrapper', 'PartialFCAmpOptimWrapper',
           'sparse_sgd_step', 'sparse_adam_step', 'sparse_step']
