"""The few error types Genesis raises on bad input.

Every one carries a single line that names the file or field at fault and says what to do; the CLI prints
that line and exits non-zero, without a traceback. Anything else escaping is a bug and keeps its traceback.
"""


class GenesisError(Exception):
    """Bad input a user can fix. `str(err)` is one line: what is wrong, where, and the fix."""

    exit_code = 2


class ConfigError(GenesisError):
    """A configuration file or override is invalid."""


class DataError(GenesisError):
    """A corpus file, shard, manifest or tokenizer is missing, corrupt or inconsistent."""


class CheckpointError(GenesisError):
    """A checkpoint is missing, incomplete, or does not belong to this run."""


class RunDirError(GenesisError):
    """A run directory is locked by another trainer or cannot be written."""
