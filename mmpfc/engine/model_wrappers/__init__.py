from .partial_fc_ddp import PartialFCDistributedDataParallel

__all__ = ['PartialFCDistributedDataParallel']
