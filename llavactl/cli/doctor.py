"""`llavactl doctor`: each check as a short block (status, check: finding, then its fix), or JSON."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Annotated

import typer

from llavactl.cli._common import OverridesArg, console, load, phase, shown, verbosity
from llavactl.cli._output import json_option, write_json

if TYPE_CHECKING:
    from llavactl.doctor import CheckResult

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}
_INDENT = " " * 8  # the status column: "skipped" and a space


def doctor(
    overrides: OverridesArg = None,
    *,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="Also check this profile against the machine.", show_default=False),
    ] = None,
    as_json: Annotated[bool, json_option("Print the results as JSON.")] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Judge as if there were no internet: models must be local.")
    ] = False,
) -> None:
    """Can this machine run this profile? Exit code 1 when any check fails."""
    from llavactl.doctor import run_checks, verdict
    from llavactl.plan import plan_memory

    if overrides and profile is None:
        raise typer.BadParameter("overrides need --profile")
    loaded = load(profile, overrides) if profile else None
    with phase("doctor's checks"):
        results = run_checks(loaded, offline=offline, memory_planner=plan_memory)
    failure = verdict(results)
    if as_json:
        checks = [r.to_json() for r in results]
        write_json({"ok": failure is None, "profile": profile, "checks": checks}, failure=failure)
    else:
        print_results(results, quiet=verbosity.level == 0)
    if failure is not None:
        raise failure


def print_results(results: list[CheckResult], *, quiet: bool) -> None:
    """One block per check, wrapped at the console's width without splitting a word (a path stays whole)."""
    width = max(console.width, 40)
    for r in results:
        if quiet and r.status == "pass":
            continue
        status = f"[{_STYLE[r.status]}]{r.status:<7}[/] "
        console.print(status + shown(_wrap(f"{r.check}: {r.finding}", width)), soft_wrap=True)
        if r.fix:
            label = "fix" if r.status in ("warn", "fail") else "hint"
            console.print(_INDENT + shown(_wrap(f"{label}: {r.fix}", width)), soft_wrap=True)
    counts = {s: sum(r.status == s for r in results) for s in _STYLE}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    ready = "[bold red]Not ready[/]" if counts["fail"] else "[green]Ready[/]"
    console.print(f"\n{ready}: {summary}.")


def _wrap(text: str, width: int) -> str:
    """``text`` as lines of at most ``width`` columns after the status column; a longer word keeps its line."""
    lines = textwrap.wrap(text, width - len(_INDENT), break_long_words=False, break_on_hyphens=False)
    return f"\n{_INDENT}".join(lines)
