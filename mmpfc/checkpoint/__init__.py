"""Checkpoints of models with sharded heads: format, reading, merging."""
from .format import (FORMAT, FORMAT_VERSION, MANIFEST_KEY, build_manifest,
                     check_shard_files, get_manifest, remove_stale_shard_dirs,
                     shard_dir_name, shard_file_name)
from .io import CheckpointError, atomic_save, load_file
from .loader import CheckpointRows, StateDictDiff, compare_state_dicts
from .sharded_state import (ShardedParam, collect_shard, find_sharded_params,
                            locate_param, manifest_params, strip_sharded,
                            unwrap_model)

__all__ = [
    'FORMAT', 'FORMAT_VERSION', 'MANIFEST_KEY', 'build_manifest',
    'check_shard_files', 'get_manifest', 'remove_stale_shard_dirs',
    'shard_dir_name', 'shard_file_name', 'CheckpointError', 'atomic_save',
    'load_file', 'CheckpointRows', 'StateDictDiff', 'compare_state_dicts',
    'ShardedParam', 'collect_shard', 'find_sharded_params', 'locate_param',
    'manifest_params', 'strip_sharded', 'unwrap_model'
]
