"""A profile's data on this machine, for `data check`, `data preview` and `data convert`: their one set-up.

Each of those commands calls one function here. The set-up they share is written once: the profile's
``data.data_path`` and ``data.image_folder`` resolved, the tokenizer context the records are read
with (or why it cannot be had here: nothing is downloaded), the image limits and batching it sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llavactl.config.loader import LoadedProfile
from llavactl.data.check import CheckReport, check_dataset, write_clean, write_report
from llavactl.data.convert import convert
from llavactl.data.dataset import Batching
from llavactl.data.images import ImageLimits
from llavactl.data.preview import PreviewItem, PreviewProblem, preview_records
from llavactl.data.records import RecordSource
from llavactl.data.source import open_source
from llavactl.data.tokens import TokenContext
from llavactl.errors import ConfigError, ModelSourceError
from llavactl.model.sources import data_token_context


@dataclass(frozen=True)
class _DataSetUp:
    records: RecordSource
    image_folder: Path
    tokens: TokenContext | None
    no_tokens: str | None  # why there is no tokenizer context here
    limits: ImageLimits


def _set_up(loaded: LoadedProfile, *, tokens: bool) -> _DataSetUp:
    prof, data = loaded.profile, loaded.profile.data
    source = open_source(data, prof.seed)
    context, why = data_token_context(prof.model, data.image_size) if tokens else (None, None)
    return _DataSetUp(source.records, source.image_folder, context, why, ImageLimits.of(data))


def cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class DataCheck:
    """What `data check` found, and what it wrote."""

    report: CheckReport
    records_path: Path
    clean_records: int | None  # written to the --write-clean file; None without one


def check_data(
    loaded: LoadedProfile,
    *,
    limit: int | None = None,
    workers: int | None = None,
    decode: bool = False,
    json_file: Path | None = None,
    clean_file: Path | None = None,
) -> DataCheck:
    """Check every record of the profile's data (the first ``limit``); write the JSON report to
    ``json_file`` and the records without errors to ``clean_file`` when given."""
    if clean_file is not None and limit is not None:
        raise ConfigError(
            f"--write-clean with --limit {limit}: the records after the first {limit} would be left out of "
            "the clean file",
            fix="drop --limit to check every record and write the clean file",
        )
    prof, data = loaded.profile, loaded.profile.data
    s = _set_up(loaded, tokens=True)
    report, raws = check_dataset(
        s.records,
        s.image_folder,
        data.conversation_template,
        data.max_seq_len,
        s.tokens,
        limit=limit,
        workers=workers or cores(),
        decode=decode,
        limits=s.limits,
        skipped_checks=(f"token lengths, masks and template checks: {s.no_tokens}",) if s.no_tokens else (),
        seed=prof.seed,
        batching=Batching.of(prof),
    )
    if json_file is not None:
        write_report(json_file, report, raws)
    kept = write_clean(raws, report, clean_file) if clean_file is not None else None
    return DataCheck(report, s.records.path, kept)


def preview_data(loaded: LoadedProfile, *, n: int, index: int | None = None) -> list[PreviewItem | PreviewProblem]:
    """The profile's first ``n`` records (or record ``index``) as training prepares them."""
    s = _set_up(loaded, tokens=True)
    if s.tokens is None:
        raise ModelSourceError(f"preview needs the tokenizer and the tower's image spec: {s.no_tokens}")
    return preview_records(s.records, loaded.profile.data, s.tokens, n=n, index=index, seed=loaded.profile.seed)


def convert_data(
    loaded: LoadedProfile,
    to: Literal["parquet", "jsonl"],
    out_dir: Path,
    *,
    shard_records: int,
    force: bool = False,
) -> list[Path]:
    """Write the profile's data to ``out_dir`` as Parquet shards or JSONL; the files written."""
    s = _set_up(loaded, tokens=False)
    return convert(
        s.records,
        s.image_folder,
        to,
        out_dir,
        shard_records=shard_records,
        force=force,
        seed=loaded.profile.seed,
        limits=s.limits,
    )
