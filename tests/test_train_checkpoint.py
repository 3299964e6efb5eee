"""Checkpoint folders: atomic writes, retention, discovery, safe loading and resume checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from llavactl.errors import CheckFailed, ConfigError
from llavactl.train import checkpoint


def _save(output_dir: Path, step: int, limit: int | None = None, weights: bytes = b"w") -> Path:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return checkpoint.save_checkpoint(
        output_dir,
        step,
        write_weights=lambda folder: (folder / "adapter_model.safetensors").write_bytes(weights),
        training_state={"optimizer": optimizer.state_dict()},
        progress={"step": step},
        save_total_limit=limit,
    )


def test_checkpoint_holds_weights_states_and_progress_loadable_without_pickled_code(tmp_path: Path) -> None:
    folder = _save(tmp_path, 5)
    assert folder == tmp_path / "checkpoint-5"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "trainer_state.json",
    ]
    training_state, rng = checkpoint.read_training_state(folder)  # weights_only=True inside
    assert training_state["optimizer"]["state"][0]["step"].item() == 1
    assert set(rng) >= {"python", "torch"}
    assert checkpoint.read_progress(folder) == {"step": 5}
    assert list(tmp_path.glob(".tmp-*")) == []


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    _save(tmp_path, 10, weights=b"good")

    def crash(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"hal")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(
            tmp_path, 20, write_weights=crash, training_state={}, progress={"step": 20}, save_total_limit=1
        )
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert (tmp_path / "checkpoint-10" / "adapter_model.safetensors").read_bytes() == b"good"
    assert not (tmp_path / "checkpoint-20").exists()
    _save(tmp_path, 30)  # the next save clears the crashed temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-30"]


def test_a_folder_without_progress_record_is_not_a_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / "checkpoint-2").mkdir()  # e.g. copied by hand, half-way
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_save_total_limit_keeps_the_newest_by_step_not_by_name(tmp_path: Path) -> None:
    for step in (2, 9, 10, 11):
        _save(tmp_path, step, limit=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-11"]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 4, weights=b"old")
    _save(tmp_path, 4, weights=b"new")
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_rng_round_trip_replays_the_same_numbers() -> None:
    state = checkpoint.capture_rng()
    expected = (torch.rand(3), random.random())
    torch.rand(5)
    random.random()
    checkpoint.restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1]


def test_resume_auto_finds_latest_and_accepts_an_empty_folder(tmp_path: Path) -> None:
    assert checkpoint.resolve_resume("auto", tmp_path / "none") is None
    _save(tmp_path, 3)
    _save(tmp_path, 12)
    assert checkpoint.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-12"
    assert checkpoint.resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path) == tmp_path / "checkpoint-3"


def test_resume_path_that_is_not_a_checkpoint_lists_the_ones_inside(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    with pytest.raises(ConfigError, match="It holds checkpoints: checkpoint-3") as info:
        checkpoint.resolve_resume(str(tmp_path), tmp_path)
    assert "--resume" in (info.value.fix or "")


def test_resume_diff_ignores_run_control_keys_and_shows_the_rest() -> None:
    saved = {"seed": 1, "training": {"learning_rate": 1e-3, "output_dir": "a", "logging_steps": 1}}
    current = {"seed": 1, "training": {"learning_rate": 2e-3, "output_dir": "b", "logging_steps": 5}}
    lines = checkpoint.resume_differences(saved, current, "sha256:aa", "sha256:bb")
    assert lines == ["training.learning_rate: 0.001 -> 0.002", "data content: sha256:aa -> sha256:bb"]
    with pytest.raises(CheckFailed, match=r"training\.learning_rate: 0\.001 -> 0\.002") as info:
        checkpoint.check_resume_compatible(Path("ck"), lines, force=False)
    assert "--force" in (info.value.fix or "")
    checkpoint.check_resume_compatible(Path("ck"), lines, force=True)


def test_data_fingerprint_changes_with_content(tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": 1}]))
    before = checkpoint.fingerprint_data(str(data))
    data.write_text(json.dumps([{"id": 2}]))
    assert checkpoint.fingerprint_data(str(data)) != before
    assert checkpoint.fingerprint_data("builtin:shapes") == "builtin:shapes"
