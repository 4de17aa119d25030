"""Checkpoints of models with sharded heads: format, reading, merging."""
from .checkpointer import (LoadResult, MainFileWriter, ShardedCheckpointer,
                           check_shards_visible)
from .checksum import (file_checksum, read_sidecar, sidecar_path,
                       verify_checksum)
from .compare import (StateDictDiff, check_optimizer_matches,
                      compare_state_dicts)
from .io import (CheckpointError, SavedFile, atomic_save, load_file,
                 replace_recorded)
from .manifest import (FORMAT, FORMAT_VERSION, MANIFEST_KEY, Manifest,
                       ParamEntry, get_manifest, set_manifest)
from .rows import CheckpointRows
from .shard_files import (check_shard_files, remove_stale_shard_dirs,
                          shard_dir_name, shard_file_name)
from .sharded_state import (ShardedParam, collect_shard, find_sharded_params,
                            locate_param, manifest_params, strip_sharded,
                            unwrap_model)

__all__ = [
    'LoadResult', 'MainFileWriter', 'ShardedCheckpointer',
    'check_shards_visible', 'file_checksum', 'read_sidecar', 'sidecar_path',
    'verify_checksum', 'StateDictDiff', 'check_optimizer_matches',
    'compare_state_dicts', 'CheckpointError', 'SavedFile', 'atomic_save',
    'load_file', 'replace_recorded',
    'FORMAT', 'FORMAT_VERSION', 'MANIFEST_KEY', 'Manifest', 'ParamEntry',
    'get_manifest', 'set_manifest', 'CheckpointRows', 'check_shard_files',
    'remove_stale_shard_dirs', 'shard_dir_name', 'shard_file_name',
    'ShardedParam', 'collect_shard', 'find_sharded_params', 'locate_param',
    'manifest_params', 'strip_sharded', 'unwrap_model'
]
