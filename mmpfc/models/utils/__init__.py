from .distributed import (all_gather_with_grad, distributed_cross_entropy,
                          get_rank_and_world_size)
from .sharding import (SHARD_SAFE_CONFIG, ShardRange, active_ddp, is_sharded,
                       mark_sharded, named_sharded_tensors,
                       refuse_replicating_ddp, shard_range, sharded_names,
                       sharded_owner)

__all__ = [
    'all_gather_with_grad', 'distributed_cross_entropy',
    'get_rank_and_world_size', 'ShardRange', 'shard_range', 'mark_sharded',
    'sharded_owner', 'is_sharded', 'active_ddp', 'refuse_replicating_ddp',
    'SHARD_SAFE_CONFIG', 'named_sharded_tensors', 'sharded_names'
]
