"""`llavactl train`: a finished run, and user errors as one paragraph with an exit code."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import run_cli

from llavactl.train import loss


def test_train_runs_to_the_end_and_says_where_the_checkpoint_is(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        [
            "train",
            "--profile",
            "tiny",
            f"data.data_path={shapes}",
            "training.max_steps=2",
            "--output-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert (code, err) == (0, "")
    assert "Finished 2 steps; final loss " in out
    assert f"checkpoint in {tmp_path / 'checkpoint-2'}" in out
    assert json.loads((tmp_path / "run.json").read_text())["final_metrics"]["step"] == 2


def test_doctor_stops_the_run_first_with_its_findings_and_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.json"
    code, out, err = run_cli(
        ["train", "--profile", "tiny", f"data.data_path={missing}", "--output-dir", str(tmp_path)], capsys
    )
    assert "Loading model" not in out
    assert code == 1
    assert err.startswith("Error: llavactl doctor found 1 problem that stop this run:\n  - data: ")
    assert f"data.data_path: {missing} is not a file" in err
    assert "--skip-doctor" in err and "Traceback" not in err


def test_missing_data_file_without_doctor_is_one_paragraph_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.json"
    args = ["--profile", "tiny", f"data.data_path={missing}", "--output-dir", str(tmp_path), "--skip-doctor"]
    code, out, err = run_cli(["train", *args], capsys)
    assert "Loading model" not in out  # found before the model loads
    assert code == 2
    assert err.startswith(f"Error: data.data_path: {missing} is not a file\nFix: ")
    assert "Traceback" not in err


def test_missing_image_folder_is_exit_code_2(shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--profile", "tiny", f"data.data_path={shapes}", f"data.image_folder={tmp_path / 'gone'}"]
    code, _, err = run_cli(["train", *args, "--output-dir", str(tmp_path), "--skip-doctor"], capsys)
    assert code == 2
    assert "data.image_folder" in err and "Traceback" not in err


def test_qlora_on_a_cpu_gives_the_overrides_that_turn_it_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qlora = ["stage=qlora", "model.use_qlora=true", "model.load_in_4bit=true"]
    code, _, err = run_cli(
        ["train", "--profile", "tiny", *qlora, "--output-dir", str(tmp_path), "--skip-doctor"], capsys
    )
    assert code == 2
    assert "qlora" in err.lower()
    assert "model.use_qlora=false model.load_in_4bit=false" in err
    assert "Traceback" not in err


def _out_of_memory(model: object, batch: object) -> None:
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def test_out_of_memory_names_the_settings_that_use_less(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss, "summed_token_loss", _out_of_memory)
    code, _, err = run_cli(
        ["train", "--profile", "tiny", f"data.data_path={shapes}", "--output-dir", str(tmp_path)], capsys
    )
    assert code == 1
    assert err.startswith("Error: Step 1: the machine ran out of RAM with micro-batches of 4 records")
    assert "training.gradient_checkpointing=true" in err
    assert "training.per_device_train_batch_size=2 training.gradient_accumulation_steps=2" in err


def test_doctor_refuses_qlora_on_a_cpu_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    qlora = ["stage=qlora", "model.use_qlora=true", "model.load_in_4bit=true"]
    code, out, err = run_cli(["train", "--profile", "tiny", *qlora, "--output-dir", str(tmp_path)], capsys)
    assert code == 1 and "Loading model" not in out
    assert "QLoRA / bitsandbytes" in err
    assert "stage=lora model.use_qlora=false model.load_in_4bit=false model.load_in_8bit=false" in err


@pytest.mark.parametrize(("signum", "code", "name"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_set_up_exits_with_a_message(
    shapes: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    signum: int,
    code: int,
    name: str,
) -> None:
    import llavactl.resolve as resolve_package
    from llavactl.cli._errors import install_signal_handlers

    real = resolve_package.resolve

    def signalled(*args, **kwargs):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), signum)  # the user presses Ctrl-C (or a scheduler sends SIGTERM) while it resolves
        return real(*args, **kwargs)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(resolve_package, "resolve", signalled)
    install_signal_handlers()
    try:
        got, out, err = run_cli(
            ["train", "--profile", "tiny", f"data.data_path={shapes}", "--output-dir", str(tmp_path)], capsys
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert got == code and "Loading model" not in out
    assert f"Interrupted ({name}): stopped before the command finished" in err


def test_out_of_memory_under_a_token_budget_suggests_a_smaller_budget(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss, "summed_token_loss", _out_of_memory)
    budget = ["data.padding_free=true", "data.max_tokens_per_batch=2048"]
    code, _, err = run_cli(
        ["train", "--profile", "tiny", f"data.data_path={shapes}", *budget, "--output-dir", str(tmp_path)], capsys
    )
    assert code == 1
    assert err.startswith("Error: Step 1: the machine ran out of RAM with micro-batches of up to 2,048 tokens")
    assert "data.max_tokens_per_batch=1024 training.gradient_accumulation_steps=2" in err


def test_a_command_opens_its_data_once(shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train's doctor rows, memory plan, dataset and fingerprint read one opened source; so does data check."""
    from llavactl.data import source

    opened: list[str] = []
    real = source.open_data_path
    monkeypatch.setattr(source, "open_data_path", lambda path, *rest: opened.append(path) or real(path, *rest))
    data = f"data.data_path={shapes}"
    train = ["train", "-p", "tiny", data, f"training.output_dir={tmp_path}", "training.max_steps=1"]
    assert run_cli(train)[0] == 0 and opened == [str(shapes)]
    opened.clear()
    assert run_cli(["data", "check", "-p", "tiny", data])[0] == 0 and opened == [str(shapes)]
