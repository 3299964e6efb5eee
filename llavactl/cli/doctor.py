"""`llavactl doctor`: a table of checks, each pass / warn / fail / skipped with its fix."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llavactl.cli._common import OverridesArg, console, load, verbosity

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
    from llavactl.train.plan import plan_memory

    results = run_checks(loaded.profile if loaded else None, offline=offline, memory_planner=plan_memory)
    failed = any(r.status == "fail" for r in results)
    if as_json:
        print(json.dumps({"ok": not failed, "profile": profile, "checks": [r.to_json() for r in results]}, indent=2))
        raise typer.Exit(1 if failed else 0)
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
    console.print(f"\n{'[bold red]Not ready[/]' if failed else '[green]Ready[/]'}: {summary}.")
    raise typer.Exit(1 if failed else 0)
