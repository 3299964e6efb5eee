"""`llavactl runs list | show | compare`: the runs under a folder, one run's progress and charts, runs side by side.

Each reads the run folders (never writes there), so it works while a run trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from llavactl.cli._common import console, shown
from llavactl.cli._output import json_option, write_json

if TYPE_CHECKING:
    from llavactl.train.run_state import RunDetail, RunState

app = typer.Typer(help="See runs: their state, loss curves in the terminal or a PNG, runs side by side.")

JsonOpt = Annotated[bool, json_option("Print one JSON object instead of text, for scripts.")]
PngOpt = Annotated[
    Path | None, typer.Option("--png", help="Also write the charts as a PNG image (needs llavactl[plots]).")
]
RunArg = Annotated[Path, typer.Argument(help="A run folder (a run's training.output_dir).", show_default=False)]


@app.command("list")
def list_runs(
    folder: Annotated[Path, typer.Argument(help="The folder to look in, and below it.")] = Path("checkpoints"),
    *,
    json_output: JsonOpt = False,
) -> None:
    """Every run under FOLDER: its state, step, last loss, speed, last checkpoint and last update."""
    # Imported here, as every command's work is: `llavactl --help` reads none of it.
    from llavactl.train.run_state import find_runs, read_run

    runs = [read_run(path) for path in find_runs(folder)]
    if json_output:
        write_json({"folder": str(folder), "runs": [r.as_json() for r in runs]})
        return
    if not runs:
        console.print(f"No runs under {shown(str(folder))}.")
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    # Under 80 columns with a 20-character name: `saved` is the step of the last complete
    # checkpoint, `updated` how long ago the run last wrote a file.
    for name in ("run", "state", "step", "loss", "samples/s", "saved", "updated"):
        table.add_column(name, no_wrap=True)
    for run in runs:
        table.add_row(
            shown(_shortened(_name(run.folder, folder))),
            run.state,
            _progress(run),
            _figure(run.last_loss, ".4f"),
            _figure(run.samples_per_s, ".3g"),
            "-" if run.saved_step is None else str(run.saved_step),
            _duration(run.updated_ago_s) if run.updated_at else "-",
        )
    console.print(table)
    for run in runs:
        if run.detail:
            console.print(f"  {shown(_name(run.folder, folder))}: {run.state}: {shown(run.detail)}")


@app.command("show")
def show(
    run: RunArg,
    *,
    png: PngOpt = None,
    table: Annotated[bool, typer.Option("--table", help="The figures as a table instead of charts.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check every checkpoint file's checksum (reads them all).")
    ] = True,
    json_output: JsonOpt = False,
) -> None:
    """One run: its profile, progress and ETA, checkpoints, skipped records, and charts of its figures."""
    from llavactl.train import charts
    from llavactl.train.run_state import read_run_detail

    detail = read_run_detail(run, verify=verify)
    drawn = charts.run_charts(detail, columns=console.width)
    if png is not None:
        charts.write_png(drawn, png)
    if json_output:
        write_json(detail.as_json())
        return
    for line in _header(detail):
        console.print(line)
    if not detail.metrics:
        console.print("\nNo figures logged yet (metrics.jsonl is written every training.logging_steps).")
    elif table or console.width < 40:
        console.print(_figures_table(detail))
    else:
        for one in drawn:
            console.print("\n" + shown("\n".join(one.render())), soft_wrap=True, crop=False)
    if png is not None:
        console.print(f"\nCharts written to {shown(str(png))}.")


@app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Two or more run folders.", show_default=False)],
    *,
    png: PngOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Runs side by side: their loss curves overlaid, the profile keys that differ, their final figures."""
    from llavactl.train import charts
    from llavactl.train.run_state import profile_differences, read_run_detail

    if len(runs) < 2:
        raise typer.BadParameter("give two or more run folders")
    details = [read_run_detail(path, verify=False) for path in runs]
    names = _short_names(runs)
    overlay = charts.loss_overlay(details, names, columns=console.width)
    if png is not None:
        charts.write_png([overlay], png)
    differences = profile_differences(details)
    if json_output:
        write_json(
            {
                "runs": [{"name": n, **d.summary.as_json()} for n, d in zip(names, details, strict=True)],
                "profile_differences": differences,
                "final": {n: _final(d) for n, d in zip(names, details, strict=True)},
            }
        )
        return
    for name, path in zip(names, runs, strict=True):
        console.print(f"{name}: {shown(str(path))}")
    if any(d.series("loss") for d in details):
        console.print("\n" + shown("\n".join(overlay.render())), soft_wrap=True, crop=False)
    console.print()
    console.print(_side_by_side("profile key", names, {k: [_value(v) for v in vs] for k, vs in differences.items()}))
    if not differences:
        console.print("The runs' profiles are the same.")
    console.print()
    finals = {key: [_value(_final(d).get(key)) for d in details] for key in _FINAL_ROWS}
    console.print(_side_by_side("final", names, finals))
    if png is not None:
        console.print(f"\nChart written to {shown(str(png))}.")


_FINAL_ROWS = ("state", "step", "final_loss", "first_loss", "samples_per_s", "mfu", "train_seconds", "skipped_records")


def _final(run: RunDetail) -> dict[str, Any]:
    """The figures compared: the run's final metrics, or its latest logged ones while it trains."""
    saved = run.record.get("final_metrics")
    final = dict(saved) if isinstance(saved, dict) else {}
    last = run.metrics[-1] if run.metrics else {}
    summary = run.summary
    return {
        "state": summary.state,
        "step": _progress(summary),
        "final_loss": final.get("final_loss", summary.last_loss),
        "first_loss": final.get("first_loss", run.metrics[0].get("loss") if run.metrics else None),
        "samples_per_s": last.get("samples_per_s"),
        "mfu": final.get("mfu", last.get("mfu")),
        "train_seconds": final.get("train_seconds"),
        "skipped_records": final.get("skipped_records", last.get("skipped_records")),
    }


def _side_by_side(first: str, names: list[str], rows: dict[str, list[str]]) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    table.add_column(first, overflow="fold")
    for name in names:
        table.add_column(shown(name), overflow="fold")
    for key, values in rows.items():
        table.add_row(shown(key), *(shown(v) for v in values))
    return table


def _header(run: RunDetail) -> list[str]:
    s, record = run.summary, run.record
    lines = [f"[bold]{shown(s.folder)}[/]: {s.state}" + (f" ({shown(s.detail)})" if s.detail else "")]
    world = record.get("world") if isinstance(record.get("world"), dict) else {}
    device = record.get("device") if isinstance(record.get("device"), dict) else {}
    about = [f"profile {shown(s.profile or '?')}", f"stage {shown(s.stage or '?')}"]
    if record.get("precision"):
        about.append(f"{shown(str(record['precision']))} on {shown(str(device.get('type', '?')))}")
    about.append(f"{world.get('size') or 1} process(es)")
    lines.append("  " + ", ".join(about))
    progress = [f"step {_progress(s)}", f"loss {_figure(s.last_loss, '.4f')}"]
    if s.samples_per_s is not None:
        progress.append(f"{s.samples_per_s:.3g} samples/s")
    if s.eta_s is not None:
        progress.append(f"ETA {_duration(s.eta_s)}")
    progress.append(f"updated {_ago(s.updated_ago_s)}")
    lines.append("  " + ", ".join(progress))
    lines.append("  checkpoints:" + ("" if run.checkpoints else " none yet"))
    for c in run.checkpoints:
        state = ("complete" if c.complete else "incomplete") + (
            "" if c.verified is None else ", verified" if c.verified else f", damaged: {c.problem}"
        )
        lines.append(f"    {_checkpoint_name(c.path)}: {shown(state)}")
    skipped = ", ".join(f"{shown(code)} {count}" for code, count in sorted(run.skipped_by_code.items()))
    lines.append(f"  skipped records: {skipped or 'none'}")
    return lines


def _figures_table(run: RunDetail) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    keys = ("step", "loss", "lr", "grad_norm", "samples_per_s", "mfu")
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for m in run.metrics:
        table.add_row(*(_value(m.get(key)) for key in keys))
    return table


def _name(run_folder: str, root: Path) -> str:
    path = Path(run_folder)
    try:
        return str(path.relative_to(root)) if path != root else path.name
    except ValueError:
        return run_folder


def _shortened(name: str, most: int = 20) -> str:
    """A run's name for the table: its end, which tells runs of one folder apart (in full below it)."""
    return name if len(name) <= most else "…" + name[1 - most :]


def _short_names(paths: list[Path]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [p.name or str(p) for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _progress(run: RunState) -> str:
    if run.step is None:
        return "-"
    return f"{run.step}/{run.total_steps}" if run.total_steps else str(run.step)


def _figure(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _checkpoint_name(path: str | None) -> str:
    return Path(path).name if path else "-"


def _ago(seconds: float) -> str:
    return f"{_duration(seconds)} ago" if seconds >= 1 else "just now"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"
