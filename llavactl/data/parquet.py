"""The records of Parquet (or Arrow IPC) shards, as the Hub's vision-language data sets ship them.

A folder, a glob or one shard file is read as one data set: the shards are sorted by name, memory-
mapped (their pages live once in the OS page cache for every rank), and a record is read by
decoding only the row group that holds it. Each row becomes a LLaVA-layout value
(``{"id", "image", "conversations"}``), from either LLaVA's ``conversations`` layout or the
``messages`` layout (``role`` user/assistant/system, ``content`` a string or a list of
``{"type": "text", "text"}`` and ``{"type": "image"}`` parts).

Images are path strings relative to ``data.image_folder``, or embedded as ``datasets``' ``Image``
feature writes them (a struct ``{"bytes", "path"}``, or a list of them, under ``image`` or
``images``). An embedded image stays in its shard: the record names it with a reference
(:func:`embedded_ref`, an absolute path no file has) that :mod:`llavactl.data.images` reads through
:func:`embedded_bytes`.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llavactl.data import cache
from llavactl.data.records import Parts, Problem, RawRecord, Record, RecordProblem, parse_each
from llavactl.errors import DataError

SHARD_SUFFIXES = (".parquet", ".arrow")
# Bump when how a row becomes a record changes: what was cached of shards is then never read.
KEY_VERSION = 1
IMAGE_COLUMNS = ("image", "images")
ROLES = {"user": "human", "assistant": "gpt", "system": "system", "human": "human", "gpt": "gpt"}
# `<shard>#row=R&image=K`: absolute (so `image_folder / ref` is the ref) and no file's name.
_REF = re.compile(r"^(?P<shard>/.+)#row=(?P<row>\d+)&image=(?P<k>\d+)$")


def is_shards(path: Path) -> bool:
    """Whether ``data.data_path`` names Parquet/Arrow shards: a shard, a folder or a glob of them."""
    if path.is_file():  # a JSON file named `data[1].json` is no glob
        return path.suffix in SHARD_SUFFIXES
    return path.suffix in SHARD_SUFFIXES or path.is_dir() or glob.has_magic(str(path))


def shard_files(path: Path) -> list[Path]:
    """The shard files of ``path`` (one file, every shard under a folder, or a glob), sorted."""
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.suffix in SHARD_SUFFIXES and p.is_file()]
    elif glob.has_magic(str(path)):
        found = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).suffix in SHARD_SUFFIXES]
    else:
        found = [path] if path.is_file() else []
    if not found:
        raise DataError(
            f"data.data_path: {path} names no Parquet (.parquet) or Arrow (.arrow) shard",
            fix="point `data.data_path` at a shard, a folder of shards or a glob such as `data/train-*.parquet`",
        )
    return [p.resolve() for p in found]


def embedded_ref(shard: Path, row: int, k: int) -> str:
    """How a record names image ``k`` embedded in ``row`` of ``shard``."""
    return f"{shard}#row={row}&image={k}"


def parse_ref(path: str | Path) -> tuple[Path, int, int] | None:
    """(shard, row, k) of an embedded image's reference; None for a path of a file."""
    found = _REF.match(str(path))
    return None if found is None else (Path(found["shard"]), int(found["row"]), int(found["k"]))


def describe_ref(shard: Path, row: int, k: int) -> str:
    return f"image {k} embedded in {shard.name} row {row}"


def embedded_bytes(shard: Path, row: int, k: int) -> bytes:
    """The bytes of image ``k`` of ``row``; FileNotFoundError when the shard or the image is gone."""
    data = _embedded_field(shard, row, k, "bytes")
    if data is None:
        raise FileNotFoundError(embedded_ref(shard, row, k))
    return data


def stored_path(shard: Path, row: int, k: int) -> str | None:
    """The file name stored beside an embedded image's bytes (``datasets`` keeps the original's)."""
    return _embedded_field(shard, row, k, "path")


def _embedded_field(shard: Path, row: int, k: int, name: str) -> Any:
    try:
        structs = _image_structs(_shard(shard, _stamp(shard)).row(row))
    except OSError as e:
        raise FileNotFoundError(str(shard)) from e
    except RecordProblem:  # the row's images are not readable as such (its record says why)
        raise FileNotFoundError(embedded_ref(shard, row, k)) from None
    if structs is None or k >= len(structs) or name not in structs.type.names:
        raise FileNotFoundError(embedded_ref(shard, row, k))
    if name == "bytes" and not _is_binary(structs.type.field(name).type):
        raise FileNotFoundError(embedded_ref(shard, row, k))  # no image bytes there (`_images_of` says why)
    return structs.field(name)[k].as_py()


def _is_binary(kind: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind))


def _stamp(path: Path) -> tuple[int, ...]:
    return cache.file_stamp(path.stat())


@dataclass(frozen=True, eq=False)  # hashed by identity: one per shard and stamp (see `_shard`)
class _Shard:
    """One shard memory-mapped: a Parquet file read a row group at a time, or a mapped Arrow table."""

    path: Path
    stamp: tuple[int, ...]
    columns: list[str]
    starts: np.ndarray  # the first row of each row group (Arrow: one group), then the row count
    file: Any  # pyarrow's ParquetFile, or the whole Arrow table (zero-copy over the mapping)

    @classmethod
    def open(cls, path: Path, stamp: tuple[int, ...]) -> _Shard:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if path.suffix == ".parquet":
            f = pq.ParquetFile(pa.memory_map(str(path)))
            counts = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
            return cls(path, stamp, f.schema_arrow.names, np.cumsum([0, *counts]), f)
        table = _arrow_table(path)
        return cls(path, stamp, table.column_names, np.array([0, table.num_rows]), table)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row(self, row: int) -> Any:
        """Row ``row`` as a one-row Arrow table."""
        if not hasattr(self.file, "read_row_group"):  # Arrow
            return self.file.slice(row, 1)
        group = int(np.searchsorted(self.starts, row, side="right")) - 1
        return _group(self, group).slice(row - int(self.starts[group]), 1)


@functools.lru_cache(maxsize=2)
def _group(shard: _Shard, group: int) -> Any:
    # The group last read, process-wide: a record's text and then its images come from the same one,
    # and records are read in runs; no more is held, however many shards there are.
    return shard.file.read_row_group(group)


def _arrow_table(path: Path) -> Any:
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()  # what `datasets` writes in its cache


@functools.lru_cache(maxsize=64)
def _shard(path: Path, stamp: tuple[int, ...]) -> _Shard:
    return _Shard.open(path, stamp)  # the stamp keys the cache: a rewritten shard is opened anew


def _image_column(row: Any) -> str | None:
    """The column that holds the row's images: ``image`` or ``images``, whichever is not null;
    :class:`RecordProblem` when both hold a value (which of them the row means is not for us to pick)."""
    present = [c for c in IMAGE_COLUMNS if c in row.column_names and row.column(c).null_count == 0]
    if len(present) > 1:
        raise RecordProblem(
            "missing_field", "the row has images in both `image` and `images`; keep them in one of the columns"
        )
    return present[0] if present else None


def _image_structs(row: Any) -> Any:
    """The row's images as an Arrow array of ``{bytes, path}`` structs; None when they are not."""
    import pyarrow as pa

    column = _image_column(row)
    if column is None:
        return None
    values = row.column(column).combine_chunks()
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        values = values.flatten()
    return values if pa.types.is_struct(values.type) else None


def _images_of(row: Any, shard: Path, index: int) -> tuple[str | None, list[Any]]:
    """The row's image column and its images as the record names them: a reference for an embedded
    image (its bytes stay in the shard: only their presence is read), the path of one given by path;
    anything else is left for :func:`parse_record` to refuse."""
    column = _image_column(row)
    if column is None:
        return None, []
    structs = _image_structs(row)
    if structs is None or "bytes" not in structs.type.names:
        value = row.column(column).to_pylist()[0]
        return column, value if isinstance(value, list) else [value]
    if not _is_binary(structs.type.field("bytes").type):
        raise RecordProblem(
            "missing_field",
            f"column `{column}`: an embedded image's `bytes` is {structs.type.field('bytes').type}, not binary "
            "(as `datasets`' Image feature writes it)",
        )
    embedded = structs.field("bytes").is_valid().to_pylist()
    paths = structs.field("path").to_pylist() if "path" in structs.type.names else [None] * len(structs)
    return column, [
        None if not structs[k].is_valid else embedded_ref(shard, index, k) if embedded[k] else paths[k]
        for k in range(len(structs))
    ]


class ParquetStore:
    """The rows of Parquet/Arrow shards, a :class:`~llavactl.data.records.RecordSource`.

    ``key`` names the shards and their fingerprints (what is cached of them is filed under it).
    """

    kind = "shards"

    def __init__(self, path: Path, shards: list[Path], key: str | None = None) -> None:
        self.path = path
        self.key = key
        self.problems: list[Problem] = []
        self.shards = shards
        counts = [len(_shard(s, _stamp(s))) for s in shards]
        self._parts = Parts(counts)
        self._summary: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._parts)

    def locate(self, i: int) -> tuple[Path, int]:
        """The shard and the row in it of record ``i``."""
        k, row = self._parts.locate(i)
        return self.shards[k], row

    def files(self) -> list[Path]:
        """The shard files (what no output may overwrite)."""
        return list(self.shards)

    def where(self, i: int) -> str:
        """How messages name record ``i``: ``train-00001-of-00004.parquet row 17``."""
        shard, row = self.locate(i)
        return f"{shard.name} row {row}"

    def raw(self, i: int) -> RawRecord:
        """Row ``i`` as a LLaVA-layout value (``line`` is its row in its shard); :class:`RecordProblem`
        ``bad_json`` when the row cannot be decoded."""
        shard_path, row = self.locate(i)
        try:
            table = _shard(shard_path, _stamp(shard_path)).row(row)
            column, images = _images_of(table, shard_path, row)
            value = table.drop_columns([c for c in IMAGE_COLUMNS if c in table.column_names]).to_pylist()[0]
        except (OSError, ValueError) as e:  # pyarrow's errors are these: a damaged page, a bad value
            # A row that cannot be decoded is what an element that is not JSON is to a JSON file.
            raise RecordProblem("bad_json", f"{self.where(i)}: the row cannot be decoded ({e})") from None
        out: dict[str, Any] = {k: v for k, v in value.items() if k != "messages"}
        if images:
            out["image"] = images[0] if column == "image" and len(images) == 1 else images
        if "conversations" not in value and "messages" in value:
            out["conversations"] = _from_messages(value["messages"])
        return RawRecord(i, row, out)

    def parsed(self, indices: Iterable[int] | None = None) -> Iterator[Record | Problem]:
        """Each row (all, or ``indices``) as a valid record or the problem that stops it."""
        return parse_each(self, indices)

    def __iter__(self) -> Iterator[RawRecord]:
        return (self.raw(i) for i in range(len(self)))

    def _summarise(self) -> tuple[np.ndarray, np.ndarray]:
        # Reads every row (images as references, their bytes untouched): for grouping estimates only.
        if self._summary is None:
            has, sizes = np.zeros(len(self), bool), np.zeros(len(self), np.int64)
            for i in range(len(self)):
                try:
                    value = self.raw(i).value
                except RecordProblem:
                    continue  # skipped or stopped on when its turn comes
                has[i] = bool(value.get("image"))
                turns = value.get("conversations")
                texts = [t.get("value") for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
                sizes[i] = sum(len(t) for t in texts if isinstance(t, str))
            self._summary = has, sizes
        return self._summary

    def has_image(self) -> np.ndarray:
        """Whether each row has an image."""
        return self._summarise()[0]

    def sizes(self) -> np.ndarray:
        """Each row's text size in characters."""
        return self._summarise()[1]


def _from_messages(messages: Any) -> Any:
    """The ``messages`` layout as LLaVA turns; what does not fit is passed on for the checks to name."""
    if not isinstance(messages, list):
        return messages
    turns = []
    for m in messages:
        if not isinstance(m, dict):
            turns.append(m)
            continue
        role, content = m.get("role"), m.get("content")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict)]
            content = "\n".join("<image>" if p.get("type") == "image" else p.get("text") or "" for p in parts)
        turns.append({"from": ROLES.get(role, role), "value": content})
    return turns


# One entry per data file in use: a mixture opens each of its sources, and each command opens its
# whole mixture again (doctor, planner, dataset); an evicted entry would be read again.
@functools.lru_cache(maxsize=32)
def _open(path: Path, shards: tuple[Path, ...], stamps: tuple[tuple[int, ...], ...]) -> ParquetStore:
    # The key names the data set and every shard's fingerprint: what is cached of the rows (token
    # counts, `data check` reports) is filed under it, and a changed shard never meets a stale entry.
    if sum(stamp[0] for stamp in stamps) < cache.CACHE_MIN_BYTES:
        return ParquetStore(path, list(shards))  # as for a small JSON file, nothing is kept
    return ParquetStore(
        path, list(shards), cache.keyed_name(path.resolve(), (KEY_VERSION, [str(s) for s in shards], stamps))
    )


def open_shards(path: Path) -> ParquetStore:
    """The store of the shards ``path`` names, shared in this process while they are unchanged."""
    shards = shard_files(path)
    try:
        return _open(path, tuple(shards), tuple(_stamp(s) for s in shards))
    except OSError as e:
        raise DataError(f"shards of {path} cannot be read ({e})", fix="check the files and their permissions") from None
    except Exception as e:  # pyarrow's own errors: not Parquet, truncated, ...
        if type(e).__module__.startswith("pyarrow"):
            bad = _first_unreadable(shards) or path
            raise DataError(f"{bad}: not readable Parquet/Arrow ({e})", fix="rewrite or drop the shard") from None
        raise


def _first_unreadable(shards: list[Path]) -> Path | None:
    """The first of ``shards`` that does not open, to name it rather than the glob or folder."""
    for shard in shards:
        try:
            _shard(shard, _stamp(shard))
        except Exception:  # any failure names this shard
            return shard
    return None


def hub_snapshot(name: str) -> Path | None:
    """The newest cached snapshot of the Hub data set ``ORG/NAME`` (``$HF_HUB_CACHE`` or
    ``$HF_HOME/hub``); None when it is not cached. Nothing is downloaded."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or home / "hub"
    snapshots = Path(hub) / f"datasets--{name.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None
