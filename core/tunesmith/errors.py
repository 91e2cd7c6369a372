"""Errors tunesmith reports to the user as a message and a non-zero exit, never a traceback."""


class TunesmithError(Exception):
    """Base class: the message says what was wrong, where, and what would be right."""

    exit_code = 2


class ConfigError(TunesmithError):
    """An option or config-file key is unknown or has a bad value."""


class PluginError(TunesmithError):
    """A plugin is missing, duplicated or misbehaving."""


class DataError(TunesmithError):
    """A dataset file is unreadable, malformed or empty."""


class TrainingError(TunesmithError):
    """Training cannot continue (for example, too many non-finite steps in a row)."""

    exit_code = 1


class StorageError(TunesmithError):
    """The disk is full, read-only or failing; what was already written is intact."""

    exit_code = 1


class RewardError(TunesmithError):
    """A reward function raised or returned something other than one number (or None) per completion."""

    exit_code = 1


class Stopped(TunesmithError):
    """Training stopped because it was asked to (SIGTERM, Ctrl-C) after saving a checkpoint; not a failure of the run."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
