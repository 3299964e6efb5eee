"""A resume reads the data its checkpoint was saved with: an edited JSON file, Parquet shard or
mixture source stops it with a line naming what changed (`--force` takes it), and the fingerprint
is taken once per run, never at a checkpoint save."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import train_recipe

from llavactl.data import fingerprint
from llavactl.data.convert import convert
from llavactl.errors import CheckFailed


def _edit_answer(value: dict, mark: str) -> dict:
    turns = [dict(t) for t in value["conversations"]]
    turns[-1]["value"] += mark
    return {**value, "conversations": turns}


# Each: the overrides that name the data, the file to edit, and what the refusal says of it.
def _json_data(shapes: Path, tmp_path: Path) -> tuple[list[str], Path, str]:
    data = tmp_path / "data.json"
    shutil.copy(shapes, data)
    return [f"data.data_path={data}", f"data.image_folder={shapes.parent}"], data, "data: file data.json changed"


def _shard_data(shapes: Path, tmp_path: Path) -> tuple[list[str], Path, str]:
    shards = convert(shapes, shapes.parent, "parquet", tmp_path / "pq", shard_records=3)
    return [f"data.data_path={tmp_path / 'pq'}"], shards[-1], f"data: shard {shards[-1].name} changed"


def _mixture_data(shapes: Path, tmp_path: Path) -> tuple[list[str], Path, str]:
    source = tmp_path / "second.json"
    shutil.copy(shapes, source)
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        f"datasets:\n  - json_path: {shapes}\n  - json_path: second.json\n    sampling_strategy: first:4\n",
        encoding="utf-8",
    )
    return (
        [f"data.data_path={mixture}", f"data.image_folder={shapes.parent}"],
        source,
        ("data: mixture source second.json changed"),
    )


def _edit(edited: Path) -> None:
    if edited.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = pq.read_table(edited).to_pylist()
        rows[-1] = _edit_answer(rows[-1], " (edited)")
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(edited)), edited)
    else:
        values = json.loads(edited.read_text())
        values[-1] = _edit_answer(values[-1], " (edited)")
        edited.write_text(json.dumps(values))


@pytest.mark.slow
@pytest.mark.parametrize("make", [_json_data, _shard_data, _mixture_data], ids=["json", "shard", "mixture-source"])
def test_an_edited_data_file_stops_a_resume_naming_what_changed(shapes: Path, tmp_path: Path, make: object) -> None:
    data, edited, said = make(shapes, tmp_path)  # type: ignore[operator]
    out = tmp_path / "run"
    settings = [*data, f"training.output_dir={out}", "training.max_steps=2", "training.save_steps=1"]
    train_recipe(settings)
    _edit(edited)
    with pytest.raises(CheckFailed, match="The profile or data changed") as refused:
        train_recipe(settings, resume=str(out / "checkpoint-1"))
    assert said in refused.value.message and "--force" in (refused.value.fix or "")
    result, printed = train_recipe(settings, resume=str(out / "checkpoint-1"), force=True)
    assert result.step == 2 and said in printed


def test_the_fingerprint_is_taken_once_per_run_not_at_each_save(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[str] = []
    real = fingerprint.of_files

    def counted(data_path: str, *args: object, **kwargs: object) -> fingerprint.Fingerprint:
        taken.append(data_path)
        return real(data_path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fingerprint, "of_files", counted)
    out = tmp_path / "run"
    settings = [f"data.data_path={shapes}", f"training.output_dir={out}", "training.max_steps=3"]
    train_recipe([*settings, "training.save_steps=1", "training.save_total_limit=5"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert taken == [str(shapes)]
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["data_fingerprint"]
    assert list(saved["parts"]) == [str(shapes.resolve())]
