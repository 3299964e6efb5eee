"""`llavactl doctor`: a table of checks, each pass / warn / fail / skipped with its fix."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llavactl.cli._common import OverridesArg, console, load, phase, verbosity
from llavactl.errors import CheckFailed

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


def doctor(
    overrides: OverridesArg = None,
    *,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="Also check this profile against the machine.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Judge as if there were no internet: models must be local.")
    ] = False,
) -> None:
    """Can this machine run this profile? Exit code 1 when any check fails."""
    from rich.markup import escape
    from rich.table import Table

    from llavactl.doctor import run_checks

    if overrides and profile is None:
        raise typer.BadParameter("overrides need --profile")
    loaded = load(profile, overrides) if profile else None
    from llavactl.plan import plan_memory

    with phase("doctor's checks"):
        results = run_checks(loaded, offline=offline, memory_planner=plan_memory)
    failures = [r for r in results if r.status == "fail"]
    if as_json:
        print(json.dumps({"ok": not failures, "profile": profile, "checks": [r.to_json() for r in results]}, indent=2))
        _fail_on(failures)
        return
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status")
    table.add_column("finding", overflow="fold")
    table.add_column("fix / hint", overflow="fold")
    for r in results:
        if verbosity.level == 0 and r.status == "pass":
            continue
        table.add_row(escape(r.check), f"[{_STYLE[r.status]}]{r.status}[/]", escape(r.finding), escape(r.fix or ""))
    console.print(table)
    counts = {s: sum(r.status == s for r in results) for s in _STYLE}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    console.print(f"\n{'[bold red]Not ready[/]' if failures else '[green]Ready[/]'}: {summary}.")
    _fail_on(failures)


def _fail_on(failures: list) -> None:
    if failures:
        names = ", ".join(dict.fromkeys(r.check for r in failures))
        raise CheckFailed(
            f"{len(failures)} check{'s' if len(failures) > 1 else ''} failed: {names}.",
            fix="apply the fix of each failed check above, then run doctor again",
        )
