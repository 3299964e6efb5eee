"""Turn llavactl's exceptions into one paragraph and an exit code; tracebacks only for bugs.

``LLAVACTL_DEBUG=1`` re-raises everything, so the full traceback is printed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from rich.markup import escape

from llavactl.cli._common import err_console, verbosity
from llavactl.errors import LlavactlError

DEBUG_ENV = "LLAVACTL_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def print_error(exc: LlavactlError) -> None:
    err_console.print(f"[bold red]Error:[/] {escape(exc.message)}", soft_wrap=True)
    if exc.fix:
        err_console.print(f"[bold]Fix:[/] {escape(exc.fix)}", soft_wrap=True)


def run_guarded(app: Callable[[], object]) -> None:
    """Run the Typer app; map user errors to messages and exit codes."""
    try:
        app()
    except LlavactlError as exc:
        if debug_enabled():
            raise
        if verbosity.level >= 2:  # -v: where the handled error came from
            err_console.print_exception()
        print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        err_console.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:
        if debug_enabled():
            raise
        err_console.print(
            f"[bold red]Internal error[/] ({type(exc).__name__}: {escape(str(exc))}).\n"
            f"This is a bug in llavactl. Run again with {DEBUG_ENV}=1 for the full traceback and "
            "report it with that output.",
            soft_wrap=True,
        )
        sys.exit(3)
