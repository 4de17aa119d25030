"""The one error of the checkpoint code."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message says why."""
