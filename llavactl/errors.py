"""Exceptions that llavactl raises for problems a user can fix.

Every subclass carries a message (what is wrong, naming the file, field or record) and a fix
(what to do about it). The CLI turns them into one paragraph and an exit code; anything else
that escapes is a bug and gets a traceback under ``LLAVACTL_DEBUG=1``.
"""

from __future__ import annotations

import reprlib
from typing import Any

# The longest excerpt of a value, key or file name that a message quotes.
EXCERPT_CHARS = 80


class LlavactlError(Exception):
    """A problem the user can fix. ``exit_code`` 2 is for usage and configuration errors."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\nFix: {self.fix}"


class ConfigError(LlavactlError):
    """A profile that cannot be loaded or does not validate (exit code 2)."""


class DataError(LlavactlError):
    """A data set, record or image that cannot be used (exit code 2)."""


class ModelSourceError(LlavactlError):
    """A model, tokenizer or weight file that cannot be found or loaded safely (exit code 2)."""


class CheckpointError(LlavactlError):
    """A checkpoint that is damaged, incomplete or not of this run (exit code 2)."""


class OutputError(LlavactlError):
    """An output folder that cannot be written: not a folder, read-only, or a full disk (exit code 2)."""


class CheckFailed(LlavactlError):
    """A check (doctor, data check, resume compatibility) found a failing condition (exit code 1)."""

    exit_code = 1


class TrainingError(LlavactlError):
    """A run that had to stop: out of memory, too many non-finite losses (exit code 1)."""

    exit_code = 1


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM outside the training loop (which saves and stops on its own): exit 130/143.

    A BaseException, so that nothing that catches errors swallows it, and not a KeyboardInterrupt,
    which Typer turns into a silent exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = EXCERPT_CHARS
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 3, 6, 4


def excerpt(value: Any) -> str:
    """``repr(value)`` cut to ``EXCERPT_CHARS`` with an ellipsis, without building the whole repr
    of a large value (a message quotes a value, never 300 MB of it)."""
    try:
        text = _SHORT_REPR.repr(value)
    except ValueError:  # an int of over 4,300 digits has no repr
        text = f"<an integer of {value.bit_length() * 0.30103:.0f} digits>"
    return excerpt_text(text)


def excerpt_text(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"
