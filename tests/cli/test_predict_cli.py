"""`llavactl predict`: the same answer from a run folder, a checkpoint and an export; streamed or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_run, run_cli, tiny_model

from llavactl.data.dataset import build_dataset
from llavactl.data.source import open_source
from llavactl.train.generate import Predictor


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, shapes: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    make_run(root / "run", shapes)
    code, _, _ = run_cli(["export", str(root / "run"), str(root / "out")])
    assert code == 0
    return root / "run", root / "out"


def test_run_folder_checkpoint_and_export_give_the_same_answer(
    exported: tuple[Path, Path], shapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, out = exported
    image = shapes.parent / "images" / "000000.png"
    answers = []
    for model in (run, run / "checkpoint-3", out):
        args = ["predict", "--model", str(model), "--image", str(image), "--max-new-tokens", "6", "--json"]
        code, text, err = run_cli(args, capsys)
        assert (code, err) == (0, "")
        answer = json.loads(text)
        assert answer["new_tokens"] == 6 and answer["prompt"] == "Describe the image."
        answers.append(answer["answer"])
    assert answers[0] == answers[1] == answers[2]


def test_answer_is_streamed_to_the_terminal(
    exported: tuple[Path, Path], shapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = exported
    image = shapes.parent / "images" / "000001.png"
    args = ["predict", "--model", str(run), "--image", str(image), "--prompt", "What colour is the shape?"]
    code, streamed, _ = run_cli([*args, "--max-new-tokens", "5"], capsys)
    _, as_json, _ = run_cli([*args, "--max-new-tokens", "5", "--json"], capsys)
    assert code == 0
    assert streamed.strip() == json.loads(as_json)["answer"]


def test_prompt_is_the_training_records_ids_up_to_the_reply(shapes: Path) -> None:
    assembled, profile = tiny_model(shapes)
    predictor = Predictor(
        assembled.model, assembled.tokenizer, assembled.image_token_id, assembled.image_spec, profile.data
    )
    dataset = build_dataset(
        open_source(profile.data, 0), profile.data, assembled.tokenizer, assembled.image_token_id, assembled.image_spec
    )
    record = next(dataset.records())
    question = record.turns[0].text.removeprefix("<image>\n")
    labels = dataset[0]["labels"].tolist()
    first_reply = next(k for k, label in enumerate(labels) if label != -100)
    assert predictor.prompt_ids(question, 1) == dataset[0]["input_ids"][:first_reply].tolist()


def test_unreadable_image_is_one_paragraph_with_exit_code_2(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = exported
    code, _, err = run_cli(["predict", "--model", str(run), "--image", str(tmp_path / "nope.png")], capsys)
    assert code == 2
    assert err.startswith(f"Error: --image: image file {tmp_path / 'nope.png'} does not exist")
    assert "Traceback" not in err


def test_a_prompt_over_the_models_positions_or_not_utf8_is_refused(
    exported: tuple[Path, Path], shapes: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = exported
    image = shapes.parent / "images" / "000000.png"
    code, _, err = run_cli(["predict", "--model", str(run), "--image", str(image), "--prompt", "x " * 3000], capsys)
    err = " ".join(err.split())
    assert code == 2 and "the model takes at most 2,048 positions" in err and "Internal error" not in err
    code, _, err = run_cli(["predict", "--model", str(run), "--image", str(image), "--prompt", "caf\udce9"], capsys)
    assert code == 2 and "--prompt is not valid UTF-8 text" in err


def test_export_into_a_file_or_under_one_is_one_paragraph(
    exported: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = exported
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    for target in (blocker, blocker / "out"):
        code, _, err = run_cli(["export", str(run), str(target)], capsys)
        assert code == 2 and "Internal error" not in err, err
        assert blocker.read_text() == "mine"
