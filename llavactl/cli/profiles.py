"""`llavactl profiles list | show`: the bundled and local profiles, resolved, with provenance."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from llavactl.cli._common import OverridesArg, console, load
from llavactl.cli._output import json_option, write_json
from llavactl.errors import ConfigError

app = typer.Typer(help="List the profiles and show one resolved, with where each value came from.")


@app.command("list")
def list_profiles() -> None:
    """Every profile that --profile NAME finds: name, description, stage and device."""
    from llavactl.config.loader import load_profile
    from llavactl.config.lookup import available_profiles, bundled_profiles_dir

    table = Table(show_edge=False, pad_edge=False)
    for column in ("name", "stage", "device", "from", "description"):
        table.add_column(column, overflow="fold" if column == "description" else "ellipsis")
    bundled = bundled_profiles_dir().resolve()
    for name, path in available_profiles().items():
        where = "bundled" if path.resolve().parent == bundled else str(path.parent)
        try:
            profile = load_profile(str(path)).profile
        except ConfigError as exc:
            table.add_row(name, "-", "-", where, f"[red]invalid:[/] {escape(_first_problem(exc.message))}")
            continue
        table.add_row(name, profile.stage, profile.training.device, where, escape(profile.description))
    console.print(table)


def _first_problem(message: str) -> str:
    """The headline of a load error: its first problem when it lists several."""
    lines = message.splitlines()
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1].strip().removeprefix("- ")
    return lines[0]


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Profile name or YAML path.", show_default=False)],
    overrides: OverridesArg = None,
    *,
    provenance: Annotated[
        bool, typer.Option("--provenance", help="Show where each value came from: default, file:line or override.")
    ] = False,
    as_json: Annotated[bool, json_option("Print JSON instead of YAML.")] = False,
) -> None:
    """The resolved profile (extends merged, overrides applied, defaults filled in)."""
    import yaml

    from llavactl.config.loader import resolved_with_origins

    loaded = load(name, overrides)
    if provenance:
        rows = [(key, value, str(origin)) for key, value, origin in resolved_with_origins(loaded)]
        if as_json:
            write_json({k: {"value": v, "from": o} for k, v, o in rows})
            return
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("key", no_wrap=True)
        table.add_column("value", overflow="fold")
        table.add_column("from", overflow="fold")
        for key, value, origin in rows:
            style = "dim" if origin == "schema default" else ""
            table.add_row(key, escape(json.dumps(value)), escape(origin), style=style)
        console.print(table)
        return
    data = loaded.profile.model_dump(mode="json")
    if as_json:
        write_json(data)
    else:
        chain = " extends ".join(p.name for p in reversed(loaded.chain))
        print(f"# {chain}" + (f", with {' '.join(loaded.overrides)}" if loaded.overrides else ""))
        print(yaml.safe_dump(data, sort_keys=False), end="")
