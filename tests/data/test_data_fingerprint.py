"""The data's fingerprint names what changed, and an older checkpoint's string is compared on what it recorded."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from llavactl.data.convert import convert
from llavactl.data.source import open_data_path


def test_an_edited_file_is_named_with_what_of_it_changed(shapes: Path, tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    shutil.copy(shapes, data)
    before = open_data_path(str(data), str(shapes.parent), 0).fingerprint
    assert before.changes_since(before.as_json()) == []
    data.write_text(data.read_text().replace('"gpt"', '"gpt" '), encoding="utf-8")
    after = open_data_path(str(data), str(shapes.parent), 0).fingerprint
    assert after.changes_since(before.as_json()) == ["data: file d.json changed (size/mtime/content)"]


def test_a_shard_gone_or_added_is_named(shapes: Path, tmp_path: Path) -> None:
    shards = convert(shapes, shapes.parent, "parquet", tmp_path / "pq", shard_records=3)
    before = open_data_path(str(tmp_path / "pq"), None, 0).fingerprint
    shards[-1].rename(tmp_path / shards[-1].name)
    after = open_data_path(str(tmp_path / "pq"), None, 0).fingerprint
    assert after.changes_since(before.as_json()) == [f"data: shard {shards[-1].name} of the checkpoint's data is gone"]
    assert before.changes_since(after.as_json()) == [f"data: shard {shards[-1].name} is new since the checkpoint"]


def test_builtin_data_is_fingerprinted_by_name_and_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAVACTL_CACHE", str(tmp_path))
    seed0 = open_data_path("builtin:shapes-eval", None, 0).fingerprint
    seed1 = open_data_path("builtin:shapes-eval", None, 1).fingerprint
    assert seed1.changes_since(seed0.as_json()) == ["data: builtin data set builtin:shapes-eval changed (seed)"]


def test_an_older_checkpoint_s_whole_file_hash_or_path_is_compared_on_what_it_recorded(
    shapes: Path, tmp_path: Path
) -> None:
    data = tmp_path / "d.json"
    shutil.copy(shapes, data)
    old = f"sha256:{hashlib.sha256(data.read_bytes()).hexdigest()}"
    assert open_data_path(str(data), str(shapes.parent), 0).fingerprint.changes_since(old) == []
    data.write_text(data.read_text().replace('"gpt"', '"gpt" '), encoding="utf-8")
    now = open_data_path(str(data), str(shapes.parent), 0).fingerprint
    assert now.changes_since(old) == ["data: file d.json changed (content)"]
    convert(shapes, shapes.parent, "parquet", tmp_path / "pq")
    shards = open_data_path(str(tmp_path / "pq"), None, 0).fingerprint
    assert shards.changes_since(str(tmp_path / "pq")) == []  # an older llavactl kept only the path of shards
    assert shards.changes_since(old) == [
        f"data: the checkpoint read one file ({old[:19]}...), this run reads {str(tmp_path / 'pq')!r}"
    ]
