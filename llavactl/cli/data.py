"""`llavactl data check | preview | synth | convert`: inspect the training data before any GPU hour is spent."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from llavactl.cli._common import OverridesArg, ProfileOpt, console, err_console, load, print_block, shown
from llavactl.cli._output import json_option, write_json
from llavactl.data.shard_layout import DEFAULT_SHARD_RECORDS
from llavactl.data.synth import DEFAULT_COUNT, DEFAULT_IMAGE_SIZE
from llavactl.errors import CheckFailed, ConfigError

if TYPE_CHECKING:
    from llavactl.data.check import CheckReport
    from llavactl.data.preview import PreviewItem, PreviewProblem

app = typer.Typer(help="Check, preview, generate and convert LLaVA-format training data.", no_args_is_help=True)

SHOWN_PER_CODE = 3
_LEVEL_STYLE = {"error": "red", "warning": "yellow"}

JsonFileOpt = Annotated[
    Path | None, typer.Option("--json-file", help="Also write the report as JSON to this file.", show_default=False)
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Check only the first N records.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1, help="Processes that tokenize records and check images [default: the cores available]."
    ),
]
DecodeOpt = Annotated[bool, typer.Option("--decode", help="Decode every image fully (finds truncated files); slower.")]
WriteCleanOpt = Annotated[
    Path | None,
    typer.Option("--write-clean", help="Write the records without errors to this file.", show_default=False),
]


@app.command("check")
def check(
    profile: ProfileOpt,
    overrides: OverridesArg = None,
    *,
    as_json: Annotated[bool, json_option("Print the report as JSON (instead of the tables).")] = False,
    json_file: JsonFileOpt = None,
    limit: LimitOpt = None,
    workers: WorkersOpt = None,
    decode: DecodeOpt = False,
    write_clean: WriteCleanOpt = None,
) -> None:
    """Scan every record for problems: structure, images, template masks, lengths. No GPU, no weights.

    Exit code 0 when no record has an error, 1 when some do, 2 for usage errors.
    """
    from llavactl.resolve.data import check_data

    _refuse_old_json_file_form(as_json, overrides)
    options = {"limit": limit, "workers": workers, "decode": decode, "json_file": json_file, "clean_file": write_clean}
    checked = check_data(load(profile, overrides), **options)
    report = checked.report
    failure = CheckFailed(*found) if (found := report.failure()) is not None else None
    # With --json the report is stdout's one JSON document; the rest goes to stderr.
    out = err_console if as_json else console
    if as_json:
        write_json(report.as_json(), failure=failure)
    else:
        _print_report(report, checked.records_path, decode)
    if json_file is not None:
        out.print(f"JSON report written to {shown(str(json_file))}")
    if checked.clean_records is not None:
        out.print(f"{checked.clean_records} records without errors written to {shown(str(write_clean))}")
    if failure is not None:
        raise failure


def _refuse_old_json_file_form(as_json: bool, overrides: list[str] | None) -> None:
    """`data check --json FILE` once wrote FILE; now --json is a flag, and FILE would be an override."""
    stray = [w for w in overrides or [] if "=" not in w]
    if as_json and stray:
        raise ConfigError(
            f"`--json {stray[0]}`: --json now prints the report to stdout (as in every command); "
            "a file is written with --json-file.",
            fix=f"use `--json-file {stray[0]}`",
        )


def _print_report(report: CheckReport, records_path: Path, decode: bool) -> None:
    from llavactl.data.check import PROFILE_CODES, counted

    s = report.stats
    console.print(f"[bold]{escape(str(records_path))}[/]: {report.records} records")
    for source in s.get("sources") or []:
        console.print(
            f"  from {escape(source['path'])}: {source['records']:,} of its {source['of']:,} records "
            f"({escape(source['sampling'])})"
        )
    counts = Table(show_edge=False, pad_edge=False, show_header=False)
    for key in ("with_image", "text_only", "multi_image", "images"):
        counts.add_row(key.replace("_", " "), str(s[key]))
    console.print(counts)
    console.print(f"images checked by {'full decode' if decode else 'existence, header and size'}")
    for note in report.skipped_checks:
        console.print(f"[yellow]skipped[/] {escape(note)}")
    if s["length"]:
        _print_lengths(s)
    if not report.problems:
        console.print("[green]no problems found[/]")
        return
    by_code: dict[str, list] = {}
    for p in report.problems:
        by_code.setdefault(p.code, []).append(p)
    console.print("problems:")
    for code, items in sorted(by_code.items()):
        # `too_long` is a warning when the cut loses text, an error when it falls in image tokens.
        level = "error" if any(p.severity == "error" for p in items) else "warning"
        firsts = [
            (f"#{p.index} id={p.id!r}: {p.message}" if p.index is not None else p.message)
            + (f". Fix: {p.fix}" if p.fix and p.severity == "warning" else "")  # an error's fix ends the report
            for p in items
        ]
        print_block(level, _LEVEL_STYLE[level], f"{code}: {counted(len(items), 'problem')}", firsts[:SHOWN_PER_CODE])
    of_profile = sum(1 for p in report.errors if p.code in PROFILE_CODES)
    of_file = sum(1 for p in report.errors if p.index is None) - of_profile
    in_records = s["errors"] - of_file - of_profile
    said = [f"{counted(in_records, 'error')} in {counted(s['records_with_errors'], 'record')}"] * bool(
        in_records or not (of_file or of_profile)
    )
    said += [f"{counted(of_file, 'error')} of the file itself"] * bool(of_file)
    said += [f"{counted(of_profile, 'error')} of the profile"] * bool(of_profile)
    console.print(f"{', '.join(said)}, {counted(s['warnings'], 'warning')}")


def _print_lengths(s: dict) -> None:
    length = s["length"]
    console.print(
        "tokens per record, image tokens included: "
        + ", ".join(f"{k} {length[k]}" for k in ("min", "p50", "p90", "p95", "p99", "max"))
        + f"; over data.max_seq_len: {length['over_max_seq_len']}"
    )
    peak = max(b["count"] for b in s["histogram"])
    for b in s["histogram"]:
        bar = "#" * round(30 * b["count"] / peak) if peak else ""
        console.print(f"  {b['from']:>7}-{b['to']:<7} {b['count']:>7} {bar}")
    padding = s.get("padding")
    if padding:
        order = "length-grouped" if padding["group_by_modality_length"] else "random-order"
        now = "on" if padding["padding_free"] else "off"
        console.print(
            f"padding: {padding['pad_fraction']:.1%} of the tokens of {order} batches of {padding['batch_size']} "
            f"are pad tokens ({padding['padded_tokens']:,} computed for {padding['tokens']:,}); padding-free "
            f"batches compute none (data.padding_free is {now})"
        )


@app.command("preview")
def preview(
    profile: ProfileOpt,
    overrides: OverridesArg = None,
    *,
    n: Annotated[int, typer.Option("-n", min=1, help="How many records to show, from the first.")] = 3,
    index: Annotated[
        int | None, typer.Option("--index", min=0, help="Show this record only.", show_default=False)
    ] = None,
    as_json: Annotated[bool, json_option("Print {index, id, prompt, supervised} per record.")] = False,
    packed: Annotated[
        bool, typer.Option("--packed", help="Show the records as one padding-free row, with its record boundaries.")
    ] = False,
) -> None:
    """Show what records train on: masked text dimmed, supervised text highlighted, images collapsed."""
    from llavactl.data.preview import packed_spans
    from llavactl.resolve.data import preview_data

    out = preview_data(load(profile, overrides), n=n, index=index)
    spans = packed_spans(out) if packed else []
    if as_json:
        where = {id(item): (start, end) for item, start, end in spans}
        write_json([_preview_json(o, where.get(id(o))) for o in out])
        return
    if packed:
        _print_packed(spans)
    else:
        _print_records(out)


_RUN_STYLES = {"masked": "dim", "supervised": "bold green", "image": "cyan"}


def _runs_text(item: PreviewItem) -> Text:
    text = Text()
    for run in item.runs:
        text.append(run.text, style=_RUN_STYLES[run.kind])
    return text


def _print_packed(spans: list[tuple[PreviewItem, int, int]]) -> None:
    total = spans[-1][2] if spans else 0
    console.print(
        f"[bold]One padding-free row of {len(spans)} records, {total:,} tokens[/] (position ids restart at each "
        "record; no record attends to another):"
    )
    for item, start, end in spans:
        console.print(f"[magenta]── tokens {start:,}-{end - 1:,}: record {item.index} (id {escape(repr(item.id))})")
        console.print(_runs_text(item))


def _print_records(out: list[PreviewItem | PreviewProblem]) -> None:
    from llavactl.data.preview import PreviewProblem

    for o in out:
        if isinstance(o, PreviewProblem):
            console.print(f"[bold]record {o.index}[/] (id {escape(repr(o.id))}): [red]{escape(o.problem)}[/]")
            continue
        console.print(f"[bold]record {o.index}[/] (id {escape(repr(o.id))})")
        console.print(_runs_text(o))
        console.print()
    console.print(
        Text.assemble("legend: ", ("masked", "dim"), "  ", ("supervised", "bold green"), "  ", ("image", "cyan"))
    )


def _preview_json(item: PreviewItem | PreviewProblem, packed: tuple[int, int] | None) -> dict:
    row = item.as_json()
    if packed is not None:
        row["packed"] = {"start": packed[0], "end": packed[1]}
    return row


@app.command("synth")
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write shapes.json and images/ into.", show_default=False)],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of records.")] = DEFAULT_COUNT,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed; the same seed gives the same files.")] = 0,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Image side in pixels.")] = DEFAULT_IMAGE_SIZE,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a folder that is not empty, over files of the same names.")
    ] = False,
) -> None:
    """Write the synthetic shapes data set (coloured shapes, captions, questions) in LLaVA format."""
    from llavactl.data.synth import write_shapes

    path = write_shapes(out_dir, n=n, seed=seed, image_size=image_size, overwrite=force)
    console.print(f"{n} records written to {escape(str(path))}")
    console.print(f"train on them with `data.data_path={escape(str(path))} data.image_folder={escape(str(out_dir))}`")


@app.command("convert")
def convert(
    profile: ProfileOpt,
    overrides: OverridesArg = None,
    *,
    to: Annotated[
        Literal["parquet", "jsonl"],
        typer.Option(
            "--to", help="parquet: shards with the images embedded; jsonl: records.jsonl beside the image files."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write into (new or empty).", show_default=False)],
    shard_records: Annotated[
        int, typer.Option("--shard-records", min=1, help="Records per Parquet shard.")
    ] = DEFAULT_SHARD_RECORDS,
    force: Annotated[
        bool, typer.Option("--force", help="Write into a folder that is not empty, over files of the same names.")
    ] = False,
) -> None:
    """Write the profile's data (`data.data_path`, `data.image_folder`) as Parquet shards or JSONL."""
    from llavactl.resolve.data import convert_data

    written = convert_data(load(profile, overrides), to, out_dir, shard_records=shard_records, force=force)
    console.print(f"{len(written)} file(s) written to {escape(str(out_dir))}")
    hint = f"data.data_path={out_dir}"
    if to == "jsonl":
        hint = f"data.data_path={written[0]} data.image_folder={out_dir}"
    console.print(f"train on them with `{escape(hint)}`")
