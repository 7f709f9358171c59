"""User-facing error types (the CLI turns each into one `gptoss-jax <cmd>: error: ...` line)."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the config: names the tensor and the file."""
