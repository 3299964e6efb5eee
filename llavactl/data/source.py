"""The one way into the data: whatever ``data.data_path`` names, opened into one :class:`DataSource`.

What a path is, is decided here and only here (:func:`open_records`), in this order:

- ``builtin:shapes`` / ``builtin:shapes-eval``: generated into the cache on first use
  (:func:`~llavactl.data.synth.shapes_dataset`; the eval set from other seeds), read as a JSON file;
- ``ORG/NAME`` that is no path but a Hub data set in the HF cache: its newest snapshot, as shards;
- a mixture file (``.yaml``/``.yml``): :mod:`llavactl.data.mixture`, each source opened here;
- Parquet/Arrow shards (a shard, a folder or a glob): :mod:`llavactl.data.parquet`;
- else a JSON list or JSONL file: :mod:`llavactl.data.json_index`.

A :class:`DataSource` carries the records (a :class:`~llavactl.data.records.RecordSource`), the folder
their image paths are relative to, what a mixture took of each source, and the data's fingerprint
(:mod:`llavactl.data.fingerprint`), so that a command opens its data once and hands it down. Opening
again is cheap: every store and fingerprint is memoised while its files are unchanged.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.data import fingerprint, synth
from llavactl.data.json_index import open_json
from llavactl.data.mixture import MixtureStore, is_mixture, open_mixture
from llavactl.data.parquet import ParquetStore, hub_snapshot, is_shards, open_shards
from llavactl.data.records import RecordSource
from llavactl.errors import DataError

if TYPE_CHECKING:
    from llavactl.config.schema import DataConfig

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("shapes", "shapes-eval")
# The held-out shapes set: other seeds, so its images are not the training images.
EVAL_SEED_OFFSET = 1 << 32
EVAL_COUNT = 200


@dataclass(frozen=True)
class DataSource:
    """The opened data of ``data_path`` (as the profile names it): its records, the folder their
    image paths are relative to, and its fingerprint."""

    data_path: str
    records: RecordSource
    image_folder: Path
    fingerprint: fingerprint.Fingerprint

    @property
    def path(self) -> Path:
        """What was opened: a file, shards (a folder or glob), a mixture file."""
        return self.records.path

    def counts(self) -> list[dict[str, Any]] | None:
        """Per source of a mixture: its path, strategy, records taken and records it has; None for one source."""
        return self.records.counts() if isinstance(self.records, MixtureStore) else None

    def mixed(self) -> str | None:
        """What a mixture took from each source, in words; None for a store of one source."""
        return self.records.describe() if isinstance(self.records, MixtureStore) else None


def open_source(data: DataConfig, seed: int) -> DataSource:
    """The data of a profile's ``data`` section (``seed``, the profile's: builtin data and a mixture's
    random picks)."""
    return open_data_path(data.data_path, data.image_folder, seed)


def open_data_path(data_path: str, image_folder: str | None, seed: int) -> DataSource:
    """The data ``data_path`` names; ``image_folder`` defaults to the data's own folder (a folder of
    shards: that folder; builtin data: its own)."""
    if data_path.startswith(BUILTIN_PREFIX):
        name = data_path[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise DataError(
                f"data.data_path: unknown builtin data set {data_path!r}",
                fix="use `builtin:shapes` (`builtin:shapes-eval` for held-out records) or a path to a JSON/JSONL file",
            )
        made = (seed + EVAL_SEED_OFFSET, EVAL_COUNT) if name == "shapes-eval" else (seed, synth.DEFAULT_COUNT)
        path = synth.shapes_dataset(*made)
        marks = fingerprint.of_builtin(data_path, seed=made[0], count=made[1], image_size=synth.DEFAULT_IMAGE_SIZE)
        return DataSource(data_path, open_json(path), path.parent, marks)
    path = Path(data_path).expanduser()
    if not path.exists() and (snapshot := hub_snapshot(data_path)) is not None:
        path = snapshot
    if not (is_shards(path) or path.is_file()):
        raise DataError(
            f"data.data_path: {path} is not a file",
            fix="set `data.data_path` to a LLaVA JSON or JSONL file, Parquet shards (a folder or a glob), "
            "a Hub data set in the HF cache (`ORG/NAME`), or `builtin:shapes`",
        )
    records = open_records(path, seed)
    folder = Path(image_folder).expanduser() if image_folder else (path if path.is_dir() else _first_dir(path))
    if not folder.is_dir():
        raise DataError(
            f"data.image_folder: {folder} is not a folder", fix="set `data.image_folder` to the images' root folder"
        )
    named = path if path.is_file() else None
    return DataSource(data_path, records, folder, fingerprint.of_files(data_path, _files(records), named))


def open_records(path: Path, seed: int = 0) -> RecordSource:
    """The records of ``path``, shared by every caller in this process while its files are unchanged:
    a mixture file of several sources (its random picks draw with the file's own ``seed``, else
    ``seed``, the profile's), Parquet/Arrow shards (a shard, a folder or a glob of them) or a JSON/JSONL
    file. Raises :class:`DataError` when the data is missing or unreadable."""
    if is_mixture(path):
        return open_mixture(path, seed, open_records)
    if is_shards(path):
        return open_shards(path)
    return open_json(path)


def records_of(records: Path | RecordSource, seed: int = 0) -> RecordSource:
    """``records`` when it is opened already (a command's :class:`DataSource`'s), else the records of
    the path (:func:`open_records`)."""
    return records if isinstance(records, RecordSource) else open_records(records, seed)


def _files(records: RecordSource) -> list[tuple[str, Path]]:
    """Every file the records are read from, with what it is to the data (how a change is named)."""
    if isinstance(records, MixtureStore):
        inner = [
            ("mixture source shard" if isinstance(store, ParquetStore) else "mixture source", f)
            for store in records.stores
            for f in store.files()
        ]
        return [("mixture file", records.path), *inner]
    what = "shard" if isinstance(records, ParquetStore) else "file"
    return [(what, f) for f in records.files()]


def _first_dir(path: Path) -> Path:
    """The folder of a file, or of a glob's fixed part (``data/*/train-*.parquet``: ``data``)."""
    parts = path.parts
    fixed = next((k for k, part in enumerate(parts) if glob.has_magic(part)), len(parts) - 1)
    return Path(*parts[:fixed]) if fixed else Path(".")
