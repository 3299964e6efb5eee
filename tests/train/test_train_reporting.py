"""What a run reports: plain progress lines, metrics.jsonl, run.json and reporter errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from llavactl.errors import ConfigError
from llavactl.train import metrics
from llavactl.train.progress import StepStats, TrainingProgress, format_bytes, format_duration

STATS = StepStats(
    step=30,
    total_steps=120,
    epoch=1.25,
    loss=2.34567,
    lr=1.5e-4,
    grad_norm=0.8123,
    samples_per_s=3.456,
    tokens_per_s=812.4,
    peak_memory_bytes=3 * 1024**3 // 2,
    eta_s=3725,
)


def test_off_a_terminal_each_logging_step_is_one_plain_line() -> None:
    out = io.StringIO()
    with TrainingProgress(Console(file=out, width=60)) as progress:
        progress.milestone("Model loaded in 1.2 s")
        progress.epoch(2, 3)
        progress.start(120, 0)
        progress.step(STATS)
    assert out.getvalue().splitlines() == [
        "Model loaded in 1.2 s",
        "Epoch 2/3",
        "step 30/120 | epoch 1.25 | loss 2.3457 | lr 1.50e-04 | grad norm 0.812 | 3.46 samples/s | "
        "812 tokens/s | peak mem 1.5 GiB | ETA 1:02:05",
    ]


def test_quiet_progress_prints_nothing() -> None:
    out = io.StringIO()
    progress = TrainingProgress(Console(file=out), quiet=True)
    progress.milestone("x")
    progress.step(STATS)
    assert out.getvalue() == ""


def test_on_a_terminal_steps_update_a_live_bar() -> None:
    out = io.StringIO()
    with TrainingProgress(Console(file=out, force_terminal=True, width=200)) as progress:
        progress.start(120, 0)
        progress.step(STATS)
    assert "30/120" in out.getvalue()
    assert "loss 2.3457" in out.getvalue()


def test_durations_and_sizes_read_naturally() -> None:
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3600 * 26 + 61) == "26:01:01"
    assert [format_bytes(n) for n in (512, 2048, 5 * 1024**2)] == ["512 B", "2.0 KiB", "5.0 MiB"]


def test_metrics_jsonl_gets_one_object_per_logged_step(tmp_path: Path) -> None:
    writer = metrics.MetricsWriter(tmp_path, [], config={})
    writer.log(1, {"loss": 2.5, "lr": 1e-3})
    writer.log(2, {"loss": 2.0, "lr": 1e-3})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.5, "lr": 1e-3},
        {"step": 2, "loss": 2.0, "lr": 1e-3},
    ]


def test_run_json_is_replaced_whole(tmp_path: Path) -> None:
    metrics.write_run_record(tmp_path, {"status": "running"})
    metrics.write_run_record(tmp_path, {"status": "completed", "final_metrics": {"final_loss": 1.0}})
    record = json.loads((tmp_path / "run.json").read_text())
    assert (record["status"], record["final_metrics"]) == ("completed", {"final_loss": 1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_versions_name_torch_and_transformers() -> None:
    assert {"python", "torch", "transformers", "peft"} <= set(metrics.library_versions())


def test_a_reporter_that_is_not_installed_says_how_to_turn_it_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="wandb package is not installed") as info:
        metrics.MetricsWriter(tmp_path, ["wandb"], config={})
    assert "training.report_to=none" in (info.value.fix or "")


def test_a_resumed_run_keeps_each_step_once_in_metrics_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo', encoding="utf-8")  # killed mid-write
    writer = metrics.MetricsWriter(tmp_path, [], config={}, from_step=2)
    writer.log(3, {"loss": 0.25})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_full_disk_while_logging_is_one_paragraph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from llavactl.errors import OutputError

    writer = metrics.MetricsWriter(tmp_path, [], config={})

    def full(_: str) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer._file, "write", full)
    with pytest.raises(OutputError, match=r"metrics\.jsonl cannot be written: No space left on device"):
        writer.log(1, {"loss": 1.0})
    monkeypatch.setattr(metrics.Path, "write_text", lambda *a, **k: full(""))
    with pytest.raises(OutputError, match=r"run\.json cannot be written: No space left on device"):
        metrics.write_run_record(tmp_path, {"status": "completed"})
