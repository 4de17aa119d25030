from .partial_fc_ddp import (PartialFCDistributedDataParallel,
                             ignores_sharded, sharded_names)

__all__ = ['PartialFCDistributedDataParallel', 'ignores_sharded',
           'sharded_names']
