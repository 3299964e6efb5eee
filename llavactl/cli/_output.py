"""Every command's `--json` output: stdout holds exactly one JSON document, the result or the error.

A command that fails before it has a result prints ``{"error": {"kind", "message", "fix", "exit_code"}}``;
one that has a result and fails (doctor's failed checks, data check's records with errors, a dry-run
whose reload differs) prints its result with that same object under the key ``"error"``. Either way
the paragraph for people goes to stderr and the exit code is the error's. The text comes from
:func:`llavactl.jsonout.dumps`, which escapes what would break a terminal or a reader.
"""

from __future__ import annotations

import re
from typing import Any

import typer

from llavactl.errors import LlavactlError
from llavactl.jsonout import dumps


class _JsonState:
    """Whether this invocation asked for --json, and whether its document is out (reset per invocation)."""

    requested = False
    written = False


state = _JsonState()


def _request(value: bool) -> bool:
    state.requested = state.requested or value
    return value


def json_option(text: str) -> Any:
    """The `--json` flag of a command, with its help text; it tells the error handler to answer in JSON."""
    return typer.Option("--json", help=text, callback=_request)


def start_invocation() -> None:
    state.requested = state.written = False


def error_object(kind: str, message: str, fix: str | None, exit_code: int) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message, "fix": fix, "exit_code": exit_code}}


def error_kind(exc: LlavactlError) -> str:
    """``ConfigError`` -> ``config``, ``CheckFailed`` -> ``check_failed``: the class, for scripts."""
    name = type(exc).__name__.removesuffix("Error") or type(exc).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def of_error(exc: LlavactlError) -> dict[str, Any]:
    return error_object(error_kind(exc), exc.message, exc.fix, exc.exit_code)


def write_json(value: dict[str, Any] | list[Any], *, failure: LlavactlError | None = None) -> None:
    """Print ``value`` as the command's JSON document; a ``failure`` the command raises next goes in it."""
    if failure is not None:
        value = {**value, **of_error(failure)}  # type: ignore[dict-item]  # a failure comes with a dict result
    print(dumps(value))
    state.written = True


def write_error(kind: str, message: str, fix: str | None, exit_code: int) -> None:
    """The error object on stdout, when the command asked for JSON and printed no document yet."""
    if state.requested and not state.written:
        print(dumps(error_object(kind, message, fix, exit_code)))
        state.written = True
