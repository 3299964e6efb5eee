"""Options, output consoles and profile loading shared by every command group."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from llavactl.config.loader import LoadedProfile

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

# Control characters (tab and newline aside) and lone surrogates: a NUL or an escape sequence in a
# file name or record id must not reach the terminal, and a surrogate cannot be written to it.
_UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def shown(text: str) -> str:
    """``text`` to print: Rich markup escaped, control characters and lone surrogates as escapes."""
    return escape(_UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text))


_INDENT = " " * 8  # the status column: "skipped" and a space


def wrapped(text: str, indent: str = "", first: str = "") -> str:
    """``text`` (plain, escaped here) as lines of the console's width, the first after ``first``
    and the next after ``indent``, without splitting a word: a path stays whole (and copyable)."""
    width = max(console.width, 40)
    lines = textwrap.wrap(
        text, width, initial_indent=first, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )
    return shown("\n".join(lines))


def print_wrapped(text: str, indent: str = "") -> None:
    """Print plain ``text`` wrapped at the console's width as :func:`wrapped` does."""
    console.print(wrapped(text, indent), soft_wrap=True)


def print_block(status: str, style: str, head: str, details: list[str]) -> None:
    """``status`` (in ``style``) then ``head``, and each of ``details`` on lines of their own under
    ``head``, wrapped as :func:`wrapped` does: the block reads the same piped into a file at 80 columns."""
    console.print(f"[{style}]{status}[/]" + wrapped(head, _INDENT, f"{status:<7} ")[len(status) :], soft_wrap=True)
    for detail in details:
        console.print(wrapped(detail, _INDENT, _INDENT), soft_wrap=True)


ProfileOpt = Annotated[
    str,
    typer.Option(
        "--profile",
        "-p",
        help="Profile name (./profiles/NAME.yaml, then the bundled ones) or a path to a YAML file.",
        show_default=False,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Overrides as key=value words, e.g. training.max_steps=10 model.use_qlora=false; "
        "key=null restores the default.",
        show_default=False,
    ),
]


class _Verbosity:
    """-v / -q from the root callback: 0 quiet, 1 normal, 2 verbose (phase timings on stderr, and
    the traceback of a handled error)."""

    level = 1


verbosity = _Verbosity()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Under ``-v``, print how long ``name`` took (on stderr, so that --json output stays clean)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if verbosity.level >= 2:
            err_console.print(f"[dim]{name}: {time.perf_counter() - start:.2f} s[/]")


def load(profile: str, overrides: list[str] | None) -> LoadedProfile:
    """The validated profile for a command's --profile and override words."""
    # Imported here: building the pydantic schema costs tens of milliseconds that --help skips.
    from llavactl.config.loader import load_profile

    return load_profile(profile, overrides or [])
