from .partial_fc_ddp import PartialFCDistributedDataParallel, sharded_names

__all__ = ['PartialFCDistributedDataParallel', 'sharded_names']
