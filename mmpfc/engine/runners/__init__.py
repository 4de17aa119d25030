from .partial_fc_runner import PartialFCRunner, check_train_data
from .sharded_checkpoint import ShardedCheckpointMixin

__all__ = ['PartialFCRunner', 'ShardedCheckpointMixin', 'check_train_data']
