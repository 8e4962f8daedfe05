"""User-facing errors.

A `LaminaError` is a problem the user can fix (a bad path, a bad flag value, a model Lamina does not
support). Its message is one line that says what is wrong and what to do; the CLI prints it without
a traceback and exits non-zero. Anything else escaping is a bug in Lamina.
"""


class LaminaError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InvalidArgumentError(LaminaError, ValueError):
    """An argument value is out of range or malformed."""


class CheckpointError(LaminaError):
    """A checkpoint is missing, unreadable, corrupt, or inconsistent."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint describes an architecture or format Lamina does not implement."""
