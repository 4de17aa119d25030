from .partial_fc_optim_wrapper import (PartialFCAmpOptimWrapper,
                                       PartialFCOptimWrapper)
from .sparse_sgd import sparse_sgd_step

__all__ = ['PartialFCOptimWrapper', 'PartialFCAmpOptimWrapper',
           'sparse_sgd_step']
