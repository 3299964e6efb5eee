"""Every store is a RecordSource and reads the same records alike; the one entry opens each kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llavactl.data.convert import convert
from llavactl.data.json_index import RecordStore
from llavactl.data.mixture import MixtureStore
from llavactl.data.parquet import ParquetStore
from llavactl.data.records import RecordSource
from llavactl.data.source import open_data_path, open_records


def _json(shapes: Path, tmp_path: Path) -> tuple[Path, list[Path], list[str | None]]:
    return shapes, [shapes], [None] * 8


def _jsonl(shapes: Path, tmp_path: Path) -> tuple[Path, list[Path], list[str | None]]:
    [lines] = convert(shapes, shapes.parent, "jsonl", tmp_path / "jsonl")
    return lines, [lines], [None] * 8


def _shards(shapes: Path, tmp_path: Path) -> tuple[Path, list[Path], list[str | None]]:
    shards = convert(shapes, shapes.parent, "parquet", tmp_path / "pq", shard_records=3)
    return tmp_path / "pq", shards, [f"{shards[i // 3].name} row {i % 3}" for i in range(8)]


def _mixture(shapes: Path, tmp_path: Path) -> tuple[Path, list[Path], list[str | None]]:
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        f"datasets:\n  - json_path: {shapes}\n    sampling_strategy: first:5\n"
        f"  - json_path: {shapes}\n    sampling_strategy: end:3\n",
        encoding="utf-8",
    )
    where = [f"{shapes.name} record {i}" for i in range(8)]
    return mixture, [mixture, shapes, shapes], where


KINDS = {"json": (_json, RecordStore), "jsonl": (_jsonl, RecordStore), "shards": (_shards, ParquetStore)}
KINDS["mixture"] = (_mixture, MixtureStore)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_store_is_a_record_source_and_reads_the_same_records(kind: str, shapes: Path, tmp_path: Path) -> None:
    make, store_type = KINDS[kind]
    path, files, where = make(shapes, tmp_path)
    store = open_records(path)
    reference = open_records(shapes)
    assert isinstance(store, store_type) and isinstance(store, RecordSource)
    assert len(store) == len(reference) == 8 and not store.problems
    got, expected = list(store.parsed()), list(reference.parsed())
    assert [(r.id, r.turns, len(r.images)) for r in got] == [(r.id, r.turns, len(r.images)) for r in expected]
    assert [store.raw(i).value["id"] for i in range(8)] == [raw.value["id"] for raw in store]
    assert store.has_image().tolist() == reference.has_image().tolist() == [True] * 8
    sizes = store.sizes()
    assert sizes.shape == (8,) and np.issubdtype(sizes.dtype, np.integer) and (sizes > 0).all()
    assert [f.resolve() for f in store.files()] == [f.resolve() for f in files]
    assert [store.where(i) for i in range(8)] == where


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_one_entry_opens_each_kind_with_its_image_folder_and_fingerprint(
    kind: str, shapes: Path, tmp_path: Path
) -> None:
    path, files, _ = KINDS[kind][0](shapes, tmp_path)
    source = open_data_path(str(path), str(shapes.parent), 0)
    again = open_records(path)
    # Opened once per file and process; a mixture (its YAML read again) shares its sources' stores.
    shared = zip(source.records.stores, again.stores, strict=True) if kind == "mixture" else [(source.records, again)]
    assert all(a is b for a, b in shared) and source.image_folder == shapes.parent
    assert set(source.fingerprint.parts) == {str(f.resolve()) for f in files}
    assert (source.counts() is None) == (kind != "mixture")
