"""`data.on_error: skip` skips every kind of bad record (a bad JSONL line, a record of the wrong
structure, images, cuts) when it is read, counts them by code, and a data set with no usable record
still stops; `data.on_error: raise` stops on the first, naming it and its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import byte_tokenizer, image_id, run_cli, train_recipe

from llavactl.config.schema import DataConfig
from llavactl.data.dataset import Collator, Skipped, build_dataset, take_skipped
from llavactl.data.images import ImageSpec
from llavactl.data.source import open_source
from llavactl.errors import DataError

SPEC = ImageSpec(32, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _mixed(folder: Path, shapes: Path, *, good: int = 6) -> Path:
    """Shapes records as JSONL with a bad line, a record without turns and one with a missing image."""
    records = json.loads(shapes.read_text())[:good]
    for r in records:
        r["image"] = str(shapes.parent / r["image"])
    lines = [json.dumps(r) for r in records]
    lines.insert(1, '{"id": "torn", "conversations": [')  # killed mid-write
    lines.insert(3, json.dumps({"id": "no-turns", "image": records[0]["image"]}))
    lines.append(json.dumps({**records[0], "id": "gone", "image": str(folder / "gone.png")}))
    path = folder / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_dataset_finds_bad_records_when_it_reads_them(shapes: Path, tmp_path: Path) -> None:
    path = _mixed(tmp_path, shapes)
    tok = byte_tokenizer()
    dataset = build_dataset(
        open_source(DataConfig(data_path=str(path), on_error="skip"), 0),
        DataConfig(data_path=str(path), on_error="skip"),
        tok,
        image_id(tok),
        SPEC,
    )
    assert len(dataset) == 9  # every line: the bad ones are found when read
    items = [dataset[i] for i in range(len(dataset))]
    skipped = [(s.index, s.code, s.id) for s in items if isinstance(s, Skipped)]
    assert skipped == [(1, "bad_json", None), (3, "missing_field", "no-turns"), (8, "missing_image", "gone")]
    assert items[1].message.startswith("line 2, column")
    assert items[3].message == "line 4: no `conversations` list"
    batch = Collator(tok.pad_token_id)([items[0], items[3]])
    with pytest.raises(DataError, match=r"record 3 \(id 'no-turns'\): missing_field: line 4: no `conversations`"):
        take_skipped(batch, "raise")


def test_training_skips_every_kind_and_counts_them_by_code(shapes: Path, tmp_path: Path) -> None:
    path = _mixed(tmp_path, shapes)
    settings = [f"data.data_path={path}", "data.on_error=skip", f"training.output_dir={tmp_path / 'run'}"]
    # Five batches of two: one epoch, every record read once.
    result, text = train_recipe([*settings, "training.max_steps=5", "training.per_device_train_batch_size=2"])
    assert result.status == "completed"
    # One line per batch with bad records, naming them (the torn line has no id): which batches
    # they fall in is the seeded order's business.
    lines = [line for line in text.splitlines() if line.startswith("Skipped bad record(s) ")]
    named = [i for line in lines for i in line.removeprefix("Skipped bad record(s) ").split(" (")[0].split(", ")]
    assert sorted(named) == ["None", "gone", "no-turns"] and all("(data.on_error: skip)" in x for x in lines)
    final = json.loads((tmp_path / "run" / "run.json").read_text())["final_metrics"]
    assert final["skipped_by_code"] == {"bad_json": 1, "missing_field": 1, "missing_image": 1}
    assert final["skipped_records"] == 3


def test_a_data_set_with_no_usable_record_stops_training_and_eval(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n{"torn": \n', encoding="utf-8")
    code, _, err = run_cli(
        [
            "train",
            "--profile",
            "tiny",
            f"data.data_path={path}",
            "data.on_error=skip",
            "--skip-doctor",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert code == 2 and "epoch 1 produced no usable record: every record was skipped as bad" in err
    # The empty steps keep their place in the schedule on purpose: no warning of torch's about it.
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    gone = tmp_path / "gone.jsonl"
    records = json.loads(shapes.read_text())[:2]
    gone.write_text("".join(json.dumps({**r, "image": "nowhere.png"}) + "\n" for r in records), encoding="utf-8")
    run = tmp_path / "trained"
    train_recipe([f"data.data_path={shapes}", f"training.output_dir={run}", "training.max_steps=1"])
    code, _, err = run_cli(
        ["eval", "--profile", "tiny", "--model", str(run), f"data.eval_data_path={gone}", "data.on_error=skip"],
        capsys,
    )
    assert code == 2 and "none of the 2 held-out records could be scored: 2 were skipped" in " ".join(err.split())
