"""Checkpoints that keep every rank's shard (placeholder, see issue 3)."""


class ShardedCheckpointMixin:
    """Runner mixin: save and load sharded heads on every rank (to be built)."""
