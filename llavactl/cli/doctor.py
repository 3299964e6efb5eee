"""`llavactl doctor`: each check as a short block (status, check: finding, then its fix), or JSON."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from llavactl.cli._common import OverridesArg, console, load, phase, print_block, verbosity
from llavactl.cli._output import json_option, write_json

if TYPE_CHECKING:
    from llavactl.doctor import CheckResult

_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


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
    """One block per check: its status, ``check: finding``, then its fix (or a pass's hint)."""
    for r in results:
        if quiet and r.status == "pass":
            continue
        label = "fix" if r.status in ("warn", "fail") else "hint"
        print_block(r.status, _STYLE[r.status], f"{r.check}: {r.finding}", [f"{label}: {r.fix}"] if r.fix else [])
    counts = {s: sum(r.status == s for r in results) for s in _STYLE}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    ready = "[bold red]Not ready[/]" if counts["fail"] else "[green]Ready[/]"
    console.print(f"\n{ready}: {summary}.")
