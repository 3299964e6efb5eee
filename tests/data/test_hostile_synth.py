"""`data synth` never writes among other files unless told, and a bad target is a clean error."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli

from llavactl.data.synth import RECORDS_FILE, write_shapes
from llavactl.errors import DataError


def test_a_non_empty_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(DataError, match=r"is not empty \(it holds notes.txt\)") as caught:
        write_shapes(tmp_path, n=2)
    assert "--force" in caught.value.fix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_writes_over_a_previous_data_set(tmp_path: Path) -> None:
    first = write_shapes(tmp_path / "s", n=3, seed=1)
    with pytest.raises(DataError, match="not empty"):
        write_shapes(tmp_path / "s", n=3, seed=2)
    before = first.read_bytes()
    assert write_shapes(tmp_path / "s", n=3, seed=2, overwrite=True) == first
    assert first.read_bytes() != before


def test_an_empty_folder_or_a_new_path_is_fine(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert write_shapes(tmp_path / "empty", n=1).name == RECORDS_FILE
    assert write_shapes(tmp_path / "a" / "b", n=1).is_file()


def test_a_file_or_a_path_under_a_file_is_a_clean_error(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="is a file, not a folder"):
        write_shapes(target, n=1, overwrite=True)
    with pytest.raises(DataError, match="cannot be made a folder"):
        write_shapes(target / "sub", n=1)


def test_cli_synth_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    code, _, err = run_cli(["data", "synth", str(tmp_path), "--n", "2"])
    assert code == 2 and "not empty" in err
    assert not (tmp_path / RECORDS_FILE).exists()
