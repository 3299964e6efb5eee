"""`llavactl runs list | show | compare`: what a person reads at 80 columns, and the JSON for scripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.fixture
def runs(finished_run: Path, tmp_path: Path) -> Path:
    """A folder of two runs: the finished one, and a copy trained (so it says) at another learning rate
    that failed."""
    shutil.copytree(finished_run, tmp_path / "base")
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    record = json.loads((other / "run.json").read_text())
    record["profile"]["training"]["learning_rate"] = 0.5
    record.update(status="failed", final_metrics={"step": 6, "error": "Step 6: the loss is NaN."})
    (other / "run.json").write_text(json.dumps(record))
    return tmp_path


def test_runs_list_names_every_run_with_its_state_and_figures(runs: Path) -> None:
    code, out, _ = run_cli(["runs", "list", str(runs)])
    assert code == 0
    base = next(line for line in out.splitlines() if line.startswith("base"))
    assert base.split()[:3] == ["base", "finished", "6/6"] and base.split()[5] == "6"
    assert "other: failed: Step 6: the loss is NaN." in out
    assert all(len(line) <= 80 for line in out.splitlines())
    code, out, _ = run_cli(["runs", "list", str(runs), "--json"])
    listed = json.loads(out)["runs"]
    assert [(Path(r["folder"]).name, r["state"]) for r in listed] == [("base", "finished"), ("other", "failed")]


def test_runs_list_of_a_folder_that_is_not_one_is_an_error(tmp_path: Path) -> None:
    code, _, err = run_cli(["runs", "list", str(tmp_path / "nowhere")])
    assert code == 2 and "is not a folder" in err


def test_runs_show_prints_the_summary_and_charts_at_80_columns(runs: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(["runs", "show", str(runs / "base"), "--png", str(tmp_path / "base.png")])
    assert code == 0 and (tmp_path / "base.png").is_file()
    lines = out.splitlines()
    assert ": finished" in out and "  step 6/6, loss " in out
    assert "    checkpoint-3: complete, verified\n    checkpoint-6: complete, verified\n" in out
    assert "loss   . raw  * smoothed" in out and "learning rate" in out and "MFU (%)" in out
    assert all(len(line) <= 80 for line in lines)
    code, out, _ = run_cli(["runs", "show", str(runs / "base"), "--table"])
    assert code == 0 and out.splitlines()[-1].split()[0] == "6"
    code, out, _ = run_cli(["runs", "show", str(runs / "base"), "--json", "--no-verify"])
    shown = json.loads(out)
    assert [m["step"] for m in shown["metrics"]] == [1, 2, 3, 4, 5, 6]
    assert shown["checkpoints"][0]["verified"] is None


def test_runs_show_of_a_folder_without_a_run_names_it(tmp_path: Path) -> None:
    code, _, err = run_cli(["runs", "show", str(tmp_path)])
    assert code == 2 and "holds no run" in err and str(tmp_path) in err


def test_runs_compare_overlays_the_losses_and_lists_what_differs(runs: Path) -> None:
    code, out, _ = run_cli(["runs", "compare", str(runs / "base"), str(runs / "other")])
    assert code == 0
    assert "loss (smoothed)   * base  o other" in out
    row = next(line for line in out.splitlines() if line.startswith("training.learning_rate"))
    assert row.split() == ["training.learning_rate", "0.002", "0.5"]
    state = next(line for line in out.splitlines() if line.startswith("state"))
    assert state.split() == ["state", "finished", "failed"]
    code, out, _ = run_cli(["runs", "compare", str(runs / "base"), str(runs / "other"), "--json"])
    compared = json.loads(out)
    assert compared["profile_differences"] == {"training.learning_rate": [0.002, 0.5]}
    assert compared["final"]["other"]["state"] == "failed"
    code, _, err = run_cli(["runs", "compare", str(runs / "base")])
    assert code == 2 and "two or more" in err
