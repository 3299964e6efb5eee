"""A run folder read back: its state (finished, failed, interrupted, killed, running under a held lock,
no figures yet), its figures (a torn last line passed over), checkpoints, charts and the model card."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import yaml

from llavactl.errors import ConfigError
from llavactl.train import charts
from llavactl.train.run_folder import RunFolderLock
from llavactl.train.run_state import (
    find_runs,
    profile_differences,
    read_metrics,
    read_run,
    read_run_detail,
    smoothed,
)


@pytest.fixture
def finished(finished_run: Path) -> Path:
    return finished_run


def _variant(finished: Path, folder: Path, **record: object) -> Path:
    """A copy of the finished run whose run.json says ``record`` (its other keys kept)."""
    shutil.copytree(finished, folder)
    run = json.loads((folder / "run.json").read_text())
    run.update(record)
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def test_a_finished_run_shows_its_last_step_loss_speed_and_checkpoint(finished: Path) -> None:
    metrics = read_metrics(finished)
    record = json.loads((finished / "run.json").read_text())
    run = read_run(finished)
    assert (run.state, run.step, run.total_steps, run.profile, run.stage) == ("finished", 6, 6, "tiny", "full")
    assert run.last_loss == record["final_metrics"]["final_loss"]
    assert run.samples_per_s == metrics[-1]["samples_per_s"]
    assert run.last_checkpoint == str(finished / "checkpoint-6") and run.detail is None and run.eta_s is None
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]


def test_failed_interrupted_and_killed_runs_say_how_they_ended(finished: Path, tmp_path: Path) -> None:
    error = {"step": 4, "bad_steps": 0, "error": "Step 4: the machine ran out of RAM.\nmore lines"}
    failed = read_run(_variant(finished, tmp_path / "failed", status="failed", final_metrics=error))
    assert (failed.state, failed.detail, failed.step) == ("failed", "Step 4: the machine ran out of RAM.", 6)
    stopped = read_run(_variant(finished, tmp_path / "stopped", status="interrupted", final_metrics={}))
    assert stopped.state == "interrupted" and "--resume auto" in (stopped.detail or "")
    # A record that still says running, with no live process behind it: killed without a word.
    killed = read_run(_variant(finished, tmp_path / "killed", status="running", final_metrics={}))
    assert killed.state == "interrupted" and "gone" in (killed.detail or "") and killed.pid is None


def test_a_run_whose_lock_is_held_is_running_with_its_pid_host_and_eta(finished: Path, tmp_path: Path) -> None:
    folder = _variant(finished, tmp_path / "live", status="running", final_metrics={}, total_steps=20)
    lock = RunFolderLock(folder)
    lock.acquire()
    try:
        run = read_run(folder)
    finally:
        lock.release()
    last = read_metrics(folder)[-1]
    assert (run.state, run.pid, run.host) == ("running", os.getpid(), socket.gethostname())
    assert run.global_batch == 4 and run.eta_s == pytest.approx((20 - 6) * 4 / last["samples_per_s"])
    assert read_run(folder).state == "interrupted"  # the lock let go: the process is no longer there


def test_a_torn_last_line_is_passed_over_and_a_run_without_figures_yet_is_shown(finished: Path, tmp_path: Path) -> None:
    folder = _variant(finished, tmp_path / "torn")
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 1.2')  # being written when it was read
    assert [m["step"] for m in read_metrics(folder)] == [1, 2, 3, 4, 5, 6]
    young = tmp_path / "young"
    young.mkdir()
    (young / "run.json").write_text(json.dumps({"status": "running", "total_steps": 100, "profile_source": "a.yaml"}))
    detail = read_run_detail(young)
    assert detail.metrics == [] and detail.checkpoints == [] and detail.summary.step is None
    assert charts.run_charts(detail) == []


def test_the_list_reads_the_last_line_from_the_end_of_a_long_metrics_file(finished: Path, tmp_path: Path) -> None:
    from llavactl.train import run_state

    folder = _variant(finished, tmp_path / "long")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    # 2,000 earlier lines in front (the file is then far longer than the tail read), a torn one at the end.
    earlier = [json.dumps({**json.loads(lines[0]), "step": -k}) for k in range(2000, 0, -1)]
    (folder / "metrics.jsonl").write_text("\n".join([*earlier, *lines]) + '\n{"step": 7, "lo')
    assert (folder / "metrics.jsonl").stat().st_size > 4 * run_state.TAIL_BYTES
    assert run_state.last_metrics(folder) == json.loads(lines[-1])
    assert read_run(folder).samples_per_s == json.loads(lines[-1])["samples_per_s"]
    assert run_state.last_metrics(tmp_path) == {}


def test_runs_are_found_under_a_folder_not_in_checkpoints_or_through_links(finished: Path, tmp_path: Path) -> None:
    _variant(finished, tmp_path / "project" / "b")
    _variant(finished, tmp_path / "a")
    (tmp_path / "latest").symlink_to(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "project" / "b"]


def test_checkpoints_are_listed_complete_and_verified_or_named_damaged(finished: Path, tmp_path: Path) -> None:
    folder = _variant(finished, tmp_path / "damaged")
    with (folder / "checkpoint-6" / "trainable.safetensors").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    (folder / "checkpoint-3" / "manifest.json").unlink()
    states = read_run_detail(folder, verify=True).checkpoints
    assert [(c.step, c.complete, c.verified) for c in states] == [(3, False, False), (6, True, False)]
    assert "checksum" in (states[1].problem or "")
    assert read_run(folder).last_checkpoint == str(folder / "checkpoint-6")
    assert [c.verified for c in read_run_detail(finished, verify=True).checkpoints] == [True, True]


def test_the_charts_hold_the_logged_values_at_their_steps(finished: Path) -> None:
    detail = read_run_detail(finished, verify=False)
    metrics = detail.metrics
    loss, lr, grad, speed, mfu = charts.run_charts(detail, columns=80)
    raw, smooth = loss.series
    columns = loss.columns(raw)
    # Six steps over the chart's width: step 1 in the first column, step 6 in the last.
    assert columns[0] == metrics[0]["loss"] and columns[loss.width - 1] == metrics[-1]["loss"]
    assert [y for _, y in smooth.points] == pytest.approx(smoothed([m["loss"] for m in metrics]))
    assert lr.columns(lr.series[0])[0] == metrics[0]["lr"] and grad.title == "grad norm"
    assert mfu.columns(mfu.series[0])[mfu.width - 1] == pytest.approx(100 * metrics[-1]["mfu"])
    assert speed.series[0].points[-1] == (6, metrics[-1]["samples_per_s"])
    lines = loss.render()
    lowest = min(m["loss"] for m in metrics)
    assert loss.row(lowest) == loss.height - 1 and all(len(line) <= 80 for line in lines)
    step = next(m["step"] for m in metrics if m["loss"] == lowest)
    column = round((step - 1) / 5 * (loss.width - 1))
    # The raw loss's marker on the bottom row (the smoothed curve lags above it), under its step.
    assert lines[loss.height].split("|", 1)[1][column] == "."


def test_smoothing_starts_at_the_first_value_and_follows_a_constant() -> None:
    assert smoothed([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([4.0, 0.0])[0] == 4.0 and 0.0 < smoothed([4.0, 0.0])[1] < 4.0


def test_the_png_decodes_at_its_size_and_without_matplotlib_the_extra_is_named(
    finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    drawn = charts.run_charts(read_run_detail(finished, verify=False))
    charts.write_png(drawn, tmp_path / "run.png")
    with Image.open(tmp_path / "run.png") as image:
        assert image.format == "PNG" and image.size == (1000, 260 * len(drawn))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"llavactl\[plots\]"):
        charts.write_png(drawn, tmp_path / "none.png")


def test_profile_differences_name_each_key_with_every_runs_value(finished: Path, tmp_path: Path) -> None:
    run = json.loads((finished / "run.json").read_text())
    run["profile"]["training"]["learning_rate"] = 0.5
    other = _variant(finished, tmp_path / "other", profile=run["profile"])
    differences = profile_differences([read_run_detail(finished), read_run_detail(other)])
    assert differences == {"training.learning_rate": [0.002, 0.5]}


@pytest.mark.slow
def test_an_export_carries_a_model_card_with_the_hubs_metadata_and_the_loss_chart(
    finished: Path, tmp_path: Path
) -> None:
    from PIL import Image

    from llavactl.train.runs import export_run

    export_run(finished, tmp_path / "export", merge_lora=False, dtype="fp32")
    card = (tmp_path / "export" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == ["builtin:tiny-llama", "builtin:tiny-clip"]
    assert (meta["library_name"], meta["pipeline_tag"]) == ("transformers", "image-text-to-text")
    assert "llava" in meta["tags"] and "datasets" not in meta  # the data is a local file, not a Hub name
    assert "- learning_rate: 0.002" in body and "- steps trained: 6" in body and "![loss" in body
    with Image.open(tmp_path / "export" / "loss.png") as image:
        assert image.size == (1000, 260)


def test_a_run_record_of_the_wrong_shapes_is_read_without_an_internal_error(finished: Path, tmp_path: Path) -> None:
    odd = {"skipped_by_code": {"bad_json": "two", "missing_image": 2}, "step": "x", "error": ["not", "text"]}
    folder = _variant(finished, tmp_path / "odd", status=5, profile=[1, 2], world="x", total_steps="many")
    record = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**record, "final_metrics": odd, "profile_source": 3}))
    (folder / ".llavactl.lock").write_text('{"pid": "x", "host": 5}')
    detail = read_run_detail(folder)
    assert (detail.summary.state, detail.summary.total_steps, detail.summary.profile) == ("starting", None, None)
    assert detail.skipped_by_code == {"missing_image": 2} and detail.summary.global_batch is None
    assert profile_differences([detail, read_run_detail(finished)])["seed"] == [None, 0]
    assert charts.run_charts(detail)[0].title == "loss"
