"""The base class of every error a user can cause (bad input, settings or environment).

The command-line runner (`boneage_tpu.cli`) prints an `Error` as one `prog: error: ...` line;
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class Error(Exception):
    """A user-facing error: the message alone tells what is wrong and what to do."""


class UsageError(Error, ValueError):
    """A bad command line or setting: unknown flag, bad value, value out of its range."""


class ConfigError(Error, ValueError):
    """Settings (or inputs) that cannot work together, found before the work needing them."""
