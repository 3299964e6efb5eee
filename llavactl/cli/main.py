"""The root `llavactl` command: assembles the command groups; holds no command logic itself.

Command modules import torch and transformers only inside their functions, so that
``llavactl --help`` and ``llavactl profiles ...`` start in a fraction of a second.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from llavactl import __version__
from llavactl.cli import data, doctor, export, profiles, runs, train
from llavactl.cli._common import console, verbosity
from llavactl.cli._errors import install_signal_handlers, run_guarded
from llavactl.train.launch import LAUNCHER_ENV, watch_launcher  # the standard library only

app = typer.Typer(
    name="llavactl",
    help="Train LLaVA-style vision-language models; catch the mistakes on a CPU before the GPU run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.add_typer(profiles.app, name="profiles")
app.add_typer(data.app, name="data")
app.add_typer(runs.app, name="runs")
app.command("doctor")(doctor.doctor)
app.command("train")(train.train)
app.command("dry-run")(train.dry_run)
app.command("export")(export.export)
app.command("predict")(export.predict)
app.command("eval")(export.evaluate)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"llavactl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    *,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Show more: timings of each phase, and the traceback of a handled error."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show only results and errors.")] = False,
) -> None:
    if verbose and quiet:
        raise typer.BadParameter("use --verbose or --quiet, not both")
    verbosity.level = 2 if verbose else 0 if quiet else 1


def main() -> None:
    install_signal_handlers()
    if LAUNCHER_ENV in os.environ:  # a worker of `train --nproc-per-node`: stop if the launcher dies
        watch_launcher()
    run_guarded(app)


if __name__ == "__main__":
    main()
