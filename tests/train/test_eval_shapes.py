"""`llavactl eval`: held-out loss and perplexity, and shapes answers scored against each record's truth."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_run, run_cli

from llavactl.data.records import Record, Turn
from llavactl.data.source import open_data_path
from llavactl.train.evaluate import COLOUR_QUESTION, SHAPE_QUESTION, Score, first_named, shapes_scores, shapes_truth


def record(rid: str, *pairs: tuple[str, str]) -> Record:
    turns = []
    for k, (question, answer) in enumerate(pairs):
        turns += [Turn("human", ("<image>\n" if k == 0 else "") + question), Turn("gpt", answer)]
    return Record(0, rid, ("images/x.png",), tuple(turns), raw={})


def test_truth_comes_from_the_caption_or_the_shape_and_colour_answers() -> None:
    caption = record("shapes-000001", ("Describe the image.", "A red circle on a blue background, at the top left."))
    questions = record("shapes-000002", (COLOUR_QUESTION, "Purple."), (SHAPE_QUESTION, "A diamond."))
    background_only = record("shapes-000003", ("What colour is the background?", "White."))
    assert shapes_truth(caption) == ("red", "circle")
    assert shapes_truth(questions) == ("purple", "diamond")
    assert shapes_truth(background_only) == (None, None)
    assert shapes_truth(record("coco-1", (COLOUR_QUESTION, "Red."))) == (None, None)


def test_an_answer_counts_by_the_first_colour_or_shape_it_names() -> None:
    from llavactl.train.evaluate import _COLOUR_WORD, _SHAPE_WORD

    assert first_named(_COLOUR_WORD, "Red.") == "red"
    assert first_named(_COLOUR_WORD, "A green square on a red background") == "green"
    assert first_named(_COLOUR_WORD, "Reddish.") is None
    assert first_named(_SHAPE_WORD, "It is a Triangle, not a square") == "triangle"


class ScriptedPredictor:
    """Answers from a table, keyed by question and image name."""

    def __init__(self, answers: dict[tuple[str, str], str]) -> None:
        self.answers = answers

    def answer_all(self, images: list[Path], question: str, *, max_new_tokens: int) -> list[str]:
        return [self.answers[(question, image.name)] for image in images]


class FakeDataset:
    def __init__(self, records: list[Record]) -> None:
        self._records = records
        self.image_folder = Path("/data")

    def records(self) -> Iterator[Record]:
        return iter(self._records)


def test_shares_count_right_answers_among_records_whose_truth_is_known() -> None:
    def at(name: str, rec: Record) -> Record:
        return Record(rec.index, rec.id, (f"images/{name}",), rec.turns, raw={})

    records = [
        at("a.png", record("shapes-a", ("Describe the image.", "A red circle on a blue background, in the centre."))),
        at("b.png", record("shapes-b", (COLOUR_QUESTION, "Green."))),
        at("c.png", record("shapes-c", (SHAPE_QUESTION, "A square."))),
    ]
    predictor = ScriptedPredictor(
        {
            (COLOUR_QUESTION, "a.png"): "Red.",
            (COLOUR_QUESTION, "b.png"): "Blue.",
            (SHAPE_QUESTION, "a.png"): "A circle.",
            (SHAPE_QUESTION, "c.png"): "A square.",
        }
    )
    colour, shape = shapes_scores(predictor, FakeDataset(records))  # type: ignore[arg-type]
    assert (colour, shape) == (Score(1, 2), Score(2, 2))
    assert colour.share == 0.5
    assert shapes_scores(predictor, FakeDataset([record("coco", ("Hi?", "Hello."))])) is None  # type: ignore[arg-type]


def test_eval_reports_loss_perplexity_and_shapes_shares_as_json(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run", shapes)
    args = ["--profile", "tiny", f"data.eval_data_path={shapes}", "--model", str(tmp_path / "run"), "--json"]
    code, out, err = run_cli(["eval", *args], capsys)
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["records"] == 8 and report["skipped"] == 0 and report["supervised_tokens"] > 0
    assert math.isclose(report["perplexity"], math.exp(report["loss"]))
    records = json.loads(shapes.read_text())
    with_colour = sum(
        1
        for r in records
        if any(t["value"].startswith("A ") and "background" in t["value"] for t in r["conversations"])
        or any(COLOUR_QUESTION in t["value"] for t in r["conversations"])
    )
    assert report["colour"]["asked"] == with_colour
    assert 0 <= report["colour"]["correct"] <= with_colour


def test_eval_without_held_out_data_says_which_key_to_set(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(tmp_path / "run", shapes)
    args = ["--profile", "tiny", "data.eval_data_path=null", "--model", str(tmp_path / "run")]
    code, _, err = run_cli(["eval", *args], capsys)
    assert code == 2
    assert err.startswith("Error: data.eval_data_path is not set")
    assert "Fix: add `data.eval_data_path=PATH`" in err
    gone = tmp_path / "gone.json"
    code, _, err = run_cli(["eval", *args, f"data.eval_data_path={gone}"], capsys)
    assert code == 2 and f"data.eval_data_path: {gone} is not a file" in err
    assert "data.eval_data_path" in err and "data.data_path" not in err


def test_builtin_held_out_shapes_are_other_images_than_the_training_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLAVACTL_CACHE", str(tmp_path))
    train_file = open_data_path("builtin:shapes", None, 0).path
    eval_file = open_data_path("builtin:shapes-eval", None, 0).path
    held_out = json.loads(eval_file.read_text())
    assert len(held_out) == 200 and eval_file.parent != train_file.parent
    training_images = {p.read_bytes() for p in (train_file.parent / "images").iterdir()}
    assert not any((eval_file.parent / r["image"]).read_bytes() in training_images for r in held_out)
