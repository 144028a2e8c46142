"""Errors that reach the user as one line.

A :class:`DenseqaError` is an expected failure with a message that names the file, field or value and says
what to do. The command-line entry points print it as one line, with no traceback, and exit with its
``exit_code``: 2 for bad input (as argparse does), 1 for a run that started and then failed.
"""

from __future__ import annotations


class DenseqaError(Exception):
    """A failure the user can act on; its message is one line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep the message on one line even when it quotes a library's multi-line error.
        super().__init__(" ".join(str(message).split()))


class InputError(DenseqaError):
    """Bad input: a missing path, a wrong column, an invalid option. Detected before any cluster work."""

    exit_code = 2


class TrainingError(DenseqaError):
    """A run that started and could not finish (e.g. the loss became NaN)."""

    exit_code = 1


def one_line(error: Exception) -> str:
    """An exception as one line; a pydantic ValidationError as its first error, ``field.path: message``."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        first = error.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'value'}: {first['msg']}"
    return " ".join(str(error).split())
