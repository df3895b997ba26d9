"""User-facing errors: one clear line, printed without a traceback by the command-line tools."""

from __future__ import annotations


class SallError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The message names the file, field or value at fault and what was expected.
    """


class DataError(SallError):
    """The data set, manifest or an image is unusable."""


class ConfigError(SallError):
    """A configuration value is invalid."""
