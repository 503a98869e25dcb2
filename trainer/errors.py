"""Domain errors of the trainer and the exit codes the command line maps them to.

A ``UsageError`` means the user can fix the problem (bad flags, config, data or weights source):
the program exits with code 2 and prints the message. Anything else is a runtime failure and
exits with code 1.
"""

from __future__ import annotations

USAGE_EXIT_CODE = 2
RUNTIME_EXIT_CODE = 1


class UsageError(Exception):
    """Bad usage, config or data: exit code 2 with a message that names the problem."""

    exit_code = USAGE_EXIT_CODE


class ConfigError(UsageError):
    """A config key, flag or environment variable has an unknown name or a bad value."""


class DataError(UsageError):
    """The image folder is missing, malformed, or has too few usable classes or images."""


class CheckpointError(UsageError):
    """A checkpoint is missing, unreadable, unsafe, or not in the finetune-checkpoint format."""


class WeightsUnavailable(UsageError):  # noqa: N818 - the documented name
    """Starting weights were requested but cannot be obtained (no cache, no network, bad path)."""
