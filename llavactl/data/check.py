"""``data check``: scan every record for what would fail or silently hurt training.

Runs without model weights and without a GPU: structure, images (header, or a full decode with
``decode``), and, when a tokenizer and the tower's image spec are at hand, the exact token
lengths and masks the trainer would use. Every problem has a stable code (see docs/data.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from llavactl.data.cache import cache_root, keep
from llavactl.data.dataset import Batching, padding_summary
from llavactl.data.images import DEFAULT_LIMITS, ImageFileError, ImageLimits, open_rgb, probe
from llavactl.data.lengths import counting, counts_path
from llavactl.data.mixture import MixtureStore
from llavactl.data.records import (
    IMAGE_MARKER,
    Problem,
    Record,
    RecordProblem,
    RecordSource,
    Severity,
    check_image_markers,
)
from llavactl.data.source import records_of
from llavactl.data.template_fit import (
    CHAT_TEMPLATE,
    TEMPLATE_SAMPLE,
    TEMPLATE_TOKENS,
    TemplateFit,
    first_difference,
    template_fit,
)
from llavactl.data.templates import render
from llavactl.data.tokens import TokenContext
from llavactl.errors import DataError
from llavactl.jsonout import dumps

# Bump when a check's findings change for the same inputs: reports kept before are then never read.
CHECK_VERSION = 3
# Codes whose problems keep a record out of training; the others are warnings.
WARNING_CODES = frozenset({"too_long", "duplicate_id", "special_token", "empty_reply", CHAT_TEMPLATE})
# Codes of a problem of the profile (its template and tokenizer), not of the file or a record.
PROFILE_CODES = frozenset({TEMPLATE_TOKENS})
# The fix of a problem of the whole file, by its code (a record's problems are fixed record by record).
FILE_FIXES = {
    "bad_json": "correct the file where the message says (a LLaVA data file is one JSON list of records, "
    "or JSONL: one record a line), then check it again",
    "no_records": "point data.data_path at the file that holds the records",
}
PERCENTILES = (50, 90, 95, 99)
HISTOGRAM_BINS = 10


@dataclass
class CheckReport:
    """What ``data check`` found: counts, problems (sorted by record) and statistics."""

    records: int
    problems: list[Problem]
    stats: dict[str, Any]
    skipped_checks: list[str] = field(default_factory=list)
    source: Path | None = None  # the records file checked

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    def bad_indices(self) -> set[int]:
        return {p.index for p in self.errors if p.index is not None}

    def failure(self) -> tuple[str, str] | None:
        """What a failed check ends with: the finding and its fix; None when no error was found.

        A problem of the file itself (not JSON, not a list, no records) is named with its place in
        the file: no record of it was read, so counting records with errors says nothing."""
        errors = self.errors
        if not errors:
            return None
        profile = [p for p in errors if p.code in PROFILE_CODES]
        if profile:
            return f"{profile[0].message} [{profile[0].code}].", profile[0].fix or "fix the profile"
        whole = [p for p in errors if p.index is None]
        if whole:
            first, source = whole[0], str(self.source or "the data file")
            more = f" ({len(whole) - 1} more problems of the file listed above)" if len(whole) > 1 else ""
            said = first.message if source in first.message else f"{source} cannot be read as records: {first.message}"
            return (
                f"{said}{more} [{first.code}].",
                FILE_FIXES.get(first.code, "fix the file at the place named, then check it again"),
            )
        return (
            f"{counted(len(self.bad_indices()), 'record')} of {self.records:,} with errors "
            f"({counted(len(errors), 'error')} in all).",
            "fix or drop those records (listed above), or write the good ones with `--write-clean FILE`",
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "problems": [p.as_json() for p in self.problems],
            "stats": self.stats,
            "skipped_checks": self.skipped_checks,
        }


def counted(n: int, noun: str) -> str:
    """``1 record``, ``2 records``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def check_dataset(
    records: Path | RecordSource,
    image_folder: Path,
    template: str,
    max_seq_len: int,
    tokens: TokenContext | None,
    *,
    limit: int | None = None,
    workers: int = 1,
    decode: bool = False,
    limits: ImageLimits = DEFAULT_LIMITS,
    skipped_checks: tuple[str, ...] = (),
    batching: Batching | None = None,
    seed: int = 0,
) -> tuple[CheckReport, RecordSource]:
    """Check ``records`` (a store opened already, or a path: ``seed``, the profile's, for a mixture's
    random picks); return the report and the store they were read from.
    With ``batching`` and token lengths, the stats say how much of the profile's padded batches is
    padding. A report kept for the same inputs (the data file, the tokenizer, template, sizes and
    options, and every image the records name, each unchanged) is read back instead of checking
    again."""
    store = records_of(records, seed)
    records_path = store.path
    kept = _kept_path(store, image_folder, template, max_seq_len, tokens, (limit, decode, limits, batching))
    if kept is not None and (report := _read_kept(kept, records_path, skipped_checks)) is not None:
        return report, store
    report, images = _check(
        store, image_folder, template, max_seq_len, tokens, limit, workers, decode, limits, skipped_checks, batching
    )
    if kept is not None:
        report_json = json.dumps(report.as_json())
        keep(kept, report=np.array(report_json), images=np.array(json.dumps(images)), stats=_image_stats(images))
    return report, store


def _check(
    store: RecordSource,
    image_folder: Path,
    template: str,
    max_seq_len: int,
    tokens: TokenContext | None,
    limit: int | None,
    workers: int,
    decode: bool,
    limits: ImageLimits,
    skipped_checks: tuple[str, ...],
    batching: Batching | None,
) -> tuple[CheckReport, list[str]]:
    """The report, and the image paths it checked."""
    records_path = store.path
    problems = list(store.problems)
    # What the report needs of each valid record, not the record: a 665K-record file's parsed
    # records would hold several GiB, as `json.load` does.
    records: list[_Held] = []
    count = len(store) if limit is None else min(limit, len(store))
    lengths: list[int] = []
    text_only: list[bool] = []
    supervised = 0
    # Every record's token counts, over --workers processes, kept for the next check, dry-run and
    # train; counted while this process parses the records and checks their images.
    fit = template_fit(tokens.tokenizer, template) if tokens is not None else None
    if tokens is not None and fit is not None:
        problems += _template_problems(tokens.tokenizer, fit)
        problems += _chat_template_problem(tokens.tokenizer, template, store)
    # Without the tokenizer's EOS or BOS that the template writes, no record can be encoded at all:
    # the template's problem (above) is the whole answer, and nothing is counted.
    countable = tokens is not None and not (fit and fit.unencodable)
    background = (
        counting(store, tokens, template, max_seq_len, count, workers=workers)
        if countable and tokens is not None
        else contextlib.nullcontext(None)
    )
    specials = _special_texts(tokens.tokenizer) if tokens is not None else {}
    with background as counts_of:
        for parsed in store.parsed(range(count)):
            if isinstance(parsed, Record):
                records.append(_Held(parsed.index, parsed.id, parsed.images))
                if counts_of is None and (rendered := _render_problem(parsed, template)) is not None:
                    problems.append(rendered)
                if specials and (special := _special_token_problem(parsed, specials)) is not None:
                    problems.append(special)
                if (empty := _empty_reply_problem(parsed)) is not None:
                    problems.append(empty)
            elif parsed.code == "bad_json" and store.kind == "list":
                # A list with an element that is not JSON is not JSON: one problem, of the file.
                problems, records, count = [store.file_problem()], [], 0
                break
            else:
                problems.append(parsed)
        problems += _duplicate_ids(records)
        images = sorted({str(image_folder / p) for r in records for p in r.images})
        problems += _image_problems(records, images, image_folder, workers, decode, limits)
        if counts_of is not None and count:
            counts = counts_of()
            for record in records:
                i = record.index
                if i in counts.problems:
                    # A record the trainer cannot build is an error whatever its code: `too_long` is
                    # a warning when the cut only loses text, an error when it falls in image tokens.
                    problems.append(_problem(record, *counts.problems[i], "error"))
                    continue
                full, cut = int(counts.full[i]), int(counts.cut[i])
                lengths.append(full)
                text_only.append(not record.images)
                supervised += int(counts.supervised[i])
                if cut:
                    problems.append(
                        _problem(
                            record,
                            "too_long",
                            f"{full} tokens with image tokens, over data.max_seq_len={max_seq_len}: "
                            f"{cut} supervised tokens would be cut",
                        )
                    )
    n_records = count
    if n_records == 0 and not problems:
        problems.append(Problem("no_records", f"{records_path} holds no records (an empty list, or only blank lines)"))
    problems = [_located(store, p) for p in problems]
    problems.sort(key=lambda p: (-1 if p.index is None else p.index, p.code))
    stats = _stats(records, n_records, problems, lengths, supervised, max_seq_len)
    if batching is not None and lengths:
        stats["padding"] = padding_summary([min(n, max_seq_len) for n in lengths], text_only, batching)
    if isinstance(store, MixtureStore):
        stats["sources"] = store.counts()
    return CheckReport(n_records, problems, stats, list(skipped_checks), records_path), images


def _located(store: RecordSource, problem: Problem) -> Problem:
    """The problem, its message naming the shard and row of a Parquet/Arrow record."""
    where = None if problem.index is None else store.where(problem.index)
    if where is None or where in problem.message:
        return problem
    return replace(problem, message=f"{where}: {problem.message}")


def _kept_path(
    store: RecordSource,
    image_folder: Path,
    template: str,
    max_seq_len: int,
    tokens: TokenContext | None,
    options: tuple[Any, ...],
) -> Path | None:
    """Where the report of these inputs is kept (None: nothing is kept of this data file)."""
    if store.key is None:
        return None
    # The token counts' file name stands for the tokenizer, template, image size and max_seq_len.
    counted = None if tokens is None else counts_path(store, tokens, template, max_seq_len)
    key = repr((CHECK_VERSION, str(image_folder.resolve()), template, max_seq_len, counted, options))
    return cache_root() / "checks" / f"{store.key}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def _read_kept(path: Path, records_path: Path, skipped_checks: tuple[str, ...]) -> CheckReport | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            found, images, stats = json.loads(str(f["report"])), json.loads(str(f["images"])), f["stats"]
    except (OSError, ValueError, KeyError):
        return None
    # An image changed, appeared or went since: its verdict is stale, so the whole check runs.
    if not np.array_equal(_image_stats(images), stats):
        return None
    problems = [
        Problem(p["code"], p["message"], p["index"], p["id"], p["severity"], p.get("fix")) for p in found["problems"]
    ]
    return CheckReport(found["records"], problems, found["stats"], list(skipped_checks), records_path)


def _image_stats(paths: list[str]) -> np.ndarray:
    """Each image file's size, times and inode (-1s for one that cannot be read): what changes when it does."""
    out = np.full((len(paths), 4), -1, dtype=np.int64)
    for k, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out[k] = st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
    return out


class _Held(NamedTuple):
    """A valid record as the report names it."""

    index: int
    id: str | int | None
    images: tuple[str, ...]


def _problem(
    record: Record | _Held, code: str, message: str, severity: Severity | None = None, fix: str | None = None
) -> Problem:
    if severity is None:
        severity = "warning" if code in WARNING_CODES else "error"
    return Problem(code, message, record.index, record.id, severity, fix)


def _duplicate_ids(records: list[_Held]) -> list[Problem]:
    first: dict[str | int, int] = {}
    out = []
    for r in records:
        if r.id is None:
            continue
        if r.id in first:
            out.append(_problem(r, "duplicate_id", f"id {r.id!r} is also the id of record {first[r.id]}"))
        else:
            first[r.id] = r.index
    return out


def _check_image(job: tuple[str, bool, ImageLimits]) -> tuple[str, str] | None:
    path, decode, limits = job
    try:
        if decode:
            open_rgb(Path(path), limits)
        else:
            probe(Path(path), limits)
    except ImageFileError as e:
        return e.code, e.message
    return None


def _image_problems(
    records: list[_Held], paths: list[str], image_folder: Path, workers: int, decode: bool, limits: ImageLimits
) -> list[Problem]:
    jobs = [(p, decode, limits) for p in paths]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(_check_image, jobs, chunksize=max(1, min(256, len(jobs) // (4 * workers)))))
    else:
        results = [_check_image(j) for j in jobs]
    failed = {p: r for p, r in zip(paths, results, strict=True) if r is not None}
    out = []
    for r in records:
        for p in r.images:
            found = failed.get(str(image_folder / p))
            if found is not None:
                out.append(_problem(r, found[0], found[1]))
    return out


def _template_problems(tokenizer: Any, fit: TemplateFit) -> list[Problem]:
    """The template's control strings that are not tokens of the tokenizer: one error of the profile."""
    if fit.fits:
        return []
    name = getattr(tokenizer, "name_or_path", "") or "of the profile"
    return [Problem(TEMPLATE_TOKENS, fit.finding(name), severity="error", fix=fit.fix())]


def _chat_template_problem(tokenizer: Any, template: str, store: RecordSource) -> list[Problem]:
    """The warning when the tokenizer's own chat template renders the first record otherwise than
    the profile's template (:func:`~llavactl.data.template_fit.first_difference`, as doctor's)."""
    differs = first_difference(tokenizer, template, store.parsed(range(min(TEMPLATE_SAMPLE, len(store)))))
    if differs is None:
        return []
    return [_problem(differs.record, CHAT_TEMPLATE, differs.finding, fix=differs.fix)]


def _special_texts(tokenizer: Any) -> dict[str, int]:
    """The texts the tokenizer turns into its special tokens wherever they stand in a record's text
    (``</s>`` -> end of sequence), with their ids; ``<image>``, the image marker, aside."""
    if getattr(tokenizer, "split_special_tokens", False):
        return {}  # this tokenizer reads them as plain text
    added = getattr(tokenizer, "added_tokens_decoder", {})
    found = {t.content: i for i, t in added.items() if getattr(t, "special", False)}
    for text in getattr(tokenizer, "all_special_tokens", []):
        found.setdefault(text, tokenizer.convert_tokens_to_ids(text))
    return {text: i for text, i in found.items() if text and text != IMAGE_MARKER}


def _special_token_problem(record: Record, specials: dict[str, int]) -> Problem | None:
    """A warning when a turn's text holds a special token's text: the model would see that token
    (an end of sequence in mid-reply, a padding token it learns to predict), not the characters."""
    for k, turn in enumerate(record.turns):
        for text, token_id in specials.items():
            if text in turn.text:
                return _problem(
                    record,
                    "special_token",
                    f"turn {k} `value` holds {text!r}, which the tokenizer reads as its special token (id "
                    f"{token_id}), not as text; remove it or write it otherwise if it is not meant as that token",
                )
    return None


def _empty_reply_problem(record: Record) -> Problem | None:
    """A warning for a reply with no text: the model learns to end its turn at once there."""
    for k, turn in enumerate(record.turns):
        if turn.role == "gpt" and not turn.text.strip():
            return _problem(
                record,
                "empty_reply",
                f"turn {k} is a reply with no text: only the end of the turn is supervised, which teaches the "
                "model to answer that question with nothing",
            )
    return None


def _render_problem(record: Record, template: str) -> Problem | None:
    """Without a tokenizer: image markers, and whether the template can render the turns."""
    try:
        check_image_markers(record)
        if template != "tokenizer":
            render(record, template)
    except RecordProblem as e:
        return _problem(record, e.code, e.message)
    return None


def _stats(
    records: list[_Held],
    n_records: int,
    problems: list[Problem],
    lengths: list[int],
    supervised: int,
    max_seq_len: int,
) -> dict[str, Any]:
    with_image = sum(1 for r in records if r.images)
    stats: dict[str, Any] = {
        "records": n_records,
        "valid_structure": len(records),
        "with_image": with_image,
        "text_only": len(records) - with_image,
        "multi_image": sum(1 for r in records if len(r.images) > 1),
        "images": sum(len(r.images) for r in records),
        "errors": sum(1 for p in problems if p.severity == "error"),
        "warnings": sum(1 for p in problems if p.severity == "warning"),
        "problems_by_code": dict(sorted(Counter(p.code for p in problems).items())),
        "records_with_errors": len({p.index for p in problems if p.severity == "error" and p.index is not None}),
        "length": None,
        "histogram": [],
        "supervised_tokens": supervised if lengths else None,
    }
    if lengths:
        ordered = sorted(lengths)
        stats["length"] = {
            "min": ordered[0],
            "mean": round(sum(ordered) / len(ordered), 1),
            **{f"p{q}": _percentile(ordered, q) for q in PERCENTILES},
            "max": ordered[-1],
            "over_max_seq_len": sum(1 for n in ordered if n > max_seq_len),
        }
        stats["histogram"] = _histogram(ordered)
    return stats


def _percentile(ordered: list[int], q: int) -> int:
    # Nearest-rank percentile: always a length that some record has.
    rank = max(1, -(-q * len(ordered) // 100))
    return ordered[rank - 1]


def _histogram(ordered: list[int]) -> list[dict[str, int]]:
    low, high = ordered[0], ordered[-1]
    width = max(1, -(-(high - low + 1) // HISTOGRAM_BINS))
    counts = Counter((n - low) // width for n in ordered)
    return [
        {"from": low + b * width, "to": low + (b + 1) * width - 1, "count": counts.get(b, 0)}
        for b in range(max(counts) + 1)
    ]


def write_clean(store: RecordSource, report: CheckReport, out: Path) -> int:
    """Write the records checked without error-level problems to ``out`` (JSONL for ``.jsonl``, else
    a JSON list); return how many were written. Never over the records file it was checked from."""
    bad = report.bad_indices()
    keep = [store.raw(i).value for i in range(report.records) if i not in bad]
    jsonl = out.suffix == ".jsonl"
    text = "".join(dumps(v, indent=None) + "\n" for v in keep) if jsonl else dumps(keep, indent=1) + "\n"
    _write_output(out, text, store, "--write-clean", "the clean records")
    return len(keep)


def write_report(out: Path, report: CheckReport, store: RecordSource) -> None:
    """Write the JSON report to ``out`` (``--json-file``); never over the data it reports on."""
    _write_output(out, dumps(report.as_json()) + "\n", store, "--json-file", "the report")


def _write_output(out: Path, text: str, store: RecordSource, option: str, what: str) -> None:
    """Write ``text`` to ``out``, unless ``out`` is (a path or link to) a file the data is read from."""
    for data in store.files():
        if _same_file(out, data):
            link = "" if out.resolve() == data.resolve() else f" (the same file as {data})"
            raise DataError(
                f"{option} {out}{link} is a file of the data being checked; writing {what} there would "
                "replace the data",
                fix=f"write {what} to another file",
            )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DataError(
            f"{option} {out} cannot be written ({e.strerror or e}: {e.filename})",
            fix="give a file path in a folder you can write to",
        ) from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()
