"""Turn llavactl's exceptions into one paragraph and an exit code; tracebacks only for bugs.

Under `--json` the same error also goes to stdout as the error object of :mod:`llavactl.cli._output`.
``LLAVACTL_DEBUG=1`` re-raises everything, so the full traceback is printed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from llavactl.cli._common import err_console, shown, verbosity
from llavactl.cli._output import error_kind, start_invocation, write_error
from llavactl.errors import Interrupted, LlavactlError

DEBUG_ENV = "LLAVACTL_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def print_error(exc: LlavactlError) -> None:
    err_console.print(f"[bold red]Error:[/] {shown(exc.message)}", soft_wrap=True)
    if exc.fix:
        err_console.print(f"[bold]Fix:[/] {shown(exc.fix)}", soft_wrap=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM raise :class:`Interrupted` for the rest of the process (the training loop
    puts its own in place while it runs): Typer would turn a KeyboardInterrupt into a silent exit,
    and SIGTERM would end the process without a word. Kept to the process's end, so that a second
    signal while it exits does not kill it with another code."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def run_guarded(app: Callable[[], object]) -> None:
    """Run the Typer app; map user errors to messages and exit codes, Ctrl-C and SIGTERM to 130/143."""
    start_invocation()
    try:
        app()
    except Interrupted as exc:
        if debug_enabled():
            raise
        name = "Ctrl-C" if exc.signum == signal.SIGINT else "SIGTERM"
        message = (
            f"Interrupted ({name}): stopped before the command finished; what it had saved before (checkpoints, "
            "files) is kept."
        )
        write_error("interrupted", message, None, 128 + exc.signum)
        err_console.print(message, soft_wrap=True)
        sys.exit(128 + exc.signum)
    except LlavactlError as exc:
        if debug_enabled():
            raise
        if verbosity.level >= 2:  # -v: where the handled error came from
            err_console.print_exception()
        write_error(error_kind(exc), exc.message, exc.fix, exc.exit_code)
        print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # raised by code that restored Python's default handler
        if debug_enabled():
            raise
        write_error("interrupted", "Interrupted.", None, 130)
        err_console.print("Interrupted.")
        sys.exit(130)
    except Exception as exc:
        if debug_enabled():
            raise
        fix = f"run again with {DEBUG_ENV}=1 for the full traceback and report it with that output"
        write_error("internal", f"{type(exc).__name__}: {exc}", fix, 3)
        err_console.print(
            f"[bold red]Internal error[/] ({type(exc).__name__}: {shown(str(exc))}).\n"
            f"This is a bug in llavactl. Run again with {DEBUG_ENV}=1 for the full traceback and "
            "report it with that output.",
            soft_wrap=True,
        )
        sys.exit(3)
