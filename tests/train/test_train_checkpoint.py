"""Checkpoint folders: atomic writes, retention, discovery, safe loading and resume checks."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch

from llavactl.data import fingerprint
from llavactl.data.fingerprint import Fingerprint
from llavactl.data.source import open_data_path
from llavactl.errors import CheckFailed, CheckpointError, ConfigError, OutputError
from llavactl.train import checkpoint


def _save(output_dir: Path, step: int, limit: int | None = None, weights: bytes = b"w", bad_in_a_row: int = 0) -> Path:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    return checkpoint.save_checkpoint(
        output_dir,
        step,
        write_weights=lambda folder: (folder / "adapter_model.safetensors").write_bytes(weights),
        training_state={"optimizer": optimizer.state_dict()},
        progress={"step": step, "profile": {}, "bad_steps_in_a_row": bad_in_a_row},
        save_total_limit=limit,
    )


def test_checkpoint_holds_weights_states_and_progress_loadable_without_pickled_code(tmp_path: Path) -> None:
    folder = _save(tmp_path, 5)
    assert folder == tmp_path / "checkpoint-5"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_model.safetensors",
        "manifest.json",
        "optimizer.pt",
        "rng.pt",
        "trainer_state.json",
    ]
    training_state, rng = checkpoint.read_training_state(folder)  # weights_only=True inside
    assert training_state["optimizer"]["state"][0]["step"].item() == 1
    assert set(rng) >= {"python", "torch"}
    assert checkpoint.read_progress(folder) == {"step": 5, "profile": {}, "bad_steps_in_a_row": 0}
    assert checkpoint.damage(folder) is None
    assert list(tmp_path.glob(".tmp-*")) == []


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    _save(tmp_path, 10, weights=b"good")

    def crash(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"hal")
        raise OSError("disk full")

    with pytest.raises(OutputError, match="disk full") as failed:
        checkpoint.save_checkpoint(
            tmp_path, 20, write_weights=crash, training_state={}, progress={"step": 20}, save_total_limit=1
        )
    assert "checkpoints saved before it are intact" in failed.value.message
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert (tmp_path / "checkpoint-10" / "adapter_model.safetensors").read_bytes() == b"good"
    assert not (tmp_path / "checkpoint-20").exists() and list(tmp_path.glob(".tmp-*")) == []
    _save(tmp_path, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-30"]


def test_a_folder_without_progress_record_is_not_a_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / "checkpoint-2").mkdir()  # e.g. copied by hand, half-way
    assert checkpoint.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"


def test_save_total_limit_keeps_the_newest_by_step_not_by_name(tmp_path: Path) -> None:
    for step in (2, 9, 10, 11):
        _save(tmp_path, step, limit=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-11"]


def test_saving_a_step_again_keeps_the_complete_one(tmp_path: Path) -> None:
    # The same step holds the same state; keeping the folder never leaves a moment without it.
    _save(tmp_path, 4, weights=b"first")
    _save(tmp_path, 4, weights=b"again")
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


@pytest.mark.parametrize(
    ("harm", "found"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:3]), "is 3 bytes, not the"),
        (lambda f: f.write_bytes(b"\0" * f.stat().st_size), "does not hold the bytes it was saved with"),
        (lambda f: f.unlink(), "is missing"),
    ],
    ids=["truncated", "zeroed", "deleted"],
)
def test_a_damaged_file_is_named_with_the_newest_intact_checkpoint(tmp_path: Path, harm, found: str) -> None:
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4, weights=b"weights of step 4")
    for name in ("adapter_model.safetensors", "optimizer.pt", "rng.pt"):
        target = newest / name
        saved = target.read_bytes()
        harm(target)
        with pytest.raises(CheckpointError) as damaged:
            checkpoint.verify_checkpoint(newest)
        assert f"{newest} is damaged: {name} {found}" in damaged.value.message
        assert f"newest intact checkpoint is {tmp_path / 'checkpoint-2'}" in damaged.value.message
        target.write_bytes(saved)
    checkpoint.verify_checkpoint(newest)


@pytest.mark.parametrize(
    ("state", "found"),
    [
        ("{not json", "cannot be read"),
        ("[1, 2]", "not a llavactl progress record"),
        ('{"profile": {}, "step": "7"}', "not a whole number of steps"),
        ('{"profile": {}, "step": true}', "not a whole number of steps"),
        ('{"profile": {}, "step": 99}', "beyond this run's 10 steps"),
    ],
)
def test_a_progress_record_of_the_wrong_shape_is_refused(tmp_path: Path, state: str, found: str) -> None:
    folder = _save(tmp_path, 3)
    (folder / "trainer_state.json").write_text(state)
    with pytest.raises(CheckpointError, match=found):
        checkpoint.read_progress(folder, total_steps=10)


def test_retention_keeps_the_newest_checkpoint_of_a_good_step(tmp_path: Path) -> None:
    _save(tmp_path, 2, limit=2)
    for step in (3, 4, 5):  # interrupt saves during a streak of non-finite losses
        _save(tmp_path, step, limit=2, bad_in_a_row=step - 2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    assert checkpoint.latest_good_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_a_kill_mid_delete_leaves_nothing_that_looks_like_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save(tmp_path, 1, limit=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # killed before deleting
    _save(tmp_path, 2, limit=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert [p.name for p in tmp_path.glob(".tmp-*")] == [".tmp-checkpoint-checkpoint-1.deleting"]


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    _save(tmp_path, 1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=10))
    with pytest.raises(OutputError, match="Not enough space to save a checkpoint") as full:
        _save(tmp_path, 2)
    assert "--resume auto" in (full.value.fix or "")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_a_first_save_is_checked_against_its_expected_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    with pytest.raises(OutputError, match="its weights and optimizer states"):
        checkpoint.save_checkpoint(
            tmp_path,
            1,
            write_weights=lambda f: None,
            training_state={},
            progress={},
            save_total_limit=None,
            expected_bytes=10_000,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_mid_write_removes_the_partial_checkpoint(tmp_path: Path) -> None:
    import errno
    import os

    def no_space(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "adapter_model.safetensors"))

    with pytest.raises(OutputError, match="No space left on device"):
        checkpoint.save_checkpoint(
            tmp_path, 1, write_weights=no_space, training_state={}, progress={"step": 1}, save_total_limit=None
        )
    assert list(tmp_path.iterdir()) == []


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
    part = {"what": "file", "name": "d.json", "size": 2, "mtime_ns": 1, "sha256": "aa"}
    before = Fingerprint("d.json", {"/d.json": part})
    after = Fingerprint("d.json", {"/d.json": {**part, "sha256": "bb"}})
    lines = checkpoint.resume_differences(saved, current, before.as_json(), after)
    assert lines == ["training.learning_rate: 0.001 -> 0.002", "data: file d.json changed (content)"]
    with pytest.raises(CheckFailed, match=r"training\.learning_rate: 0\.001 -> 0\.002") as info:
        checkpoint.check_resume_compatible(Path("ck"), lines, force=False)
    assert "--force" in (info.value.fix or "")
    checkpoint.check_resume_compatible(Path("ck"), lines, force=True)


def test_data_fingerprint_changes_with_content(tmp_path: Path) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": 1}]))
    before = open_data_path(str(data), None, 0).fingerprint
    data.write_text(json.dumps([{"id": 2}]))
    assert open_data_path(str(data), None, 0).fingerprint != before
    assert fingerprint.of_builtin("builtin:shapes", seed=0).parts == {
        "builtin:shapes": {"what": "builtin data set", "name": "builtin:shapes", "seed": 0}
    }


@pytest.mark.parametrize(
    ("edit", "found"),
    [
        (lambda files: files["rng.pt"].update(size="big"), "lists 'rng.pt' as no manifest llavactl writes"),
        (lambda files: files.update({"rng.pt": "x"}), "lists 'rng.pt' as no manifest llavactl writes"),
        (lambda files: files.update({"../../etc/passwd": {"size": 1}}), "lists '../../etc/passwd' as no manifest"),
    ],
    ids=["size-text", "entry-text", "outside"],
)
def test_an_edited_manifest_is_named_not_an_internal_error(tmp_path: Path, edit, found: str) -> None:
    folder = _save(tmp_path, 3)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest["files"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape(found)):
        checkpoint.verify_checkpoint(folder)


def test_writers_that_fail_as_safetensors_and_torch_report_a_full_disk_remove_the_partial_checkpoint(
    tmp_path: Path,
) -> None:
    """safetensors and torch.save report a file-size limit or a full disk in their own exceptions."""
    from safetensors import SafetensorError

    failures = [
        SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
    ]
    for failure in failures:

        def fail(folder: Path, failure: Exception = failure) -> None:
            (folder / "adapter_model.safetensors").write_bytes(b"partial")
            raise failure

        with pytest.raises(OutputError, match=re.escape(str(failure)[:40])):
            checkpoint.save_checkpoint(
                tmp_path, 1, write_weights=fail, training_state={}, progress={"step": 1}, save_total_limit=None
            )
        assert list(tmp_path.iterdir()) == []

    def bug(folder: Path) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # any other error is not taken for a full disk
        checkpoint.save_checkpoint(
            tmp_path, 1, write_weights=bug, training_state={}, progress={"step": 1}, save_total_limit=None
        )


def test_optimizer_states_that_are_no_pickle_are_named(tmp_path: Path) -> None:
    """Bytes that pass the manifest (written with it, or re-hashed) but are not torch's format."""
    folder = _save(tmp_path, 3)
    (folder / "optimizer.pt").write_bytes(b"\x80\x04garbage that is no pickle")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt cannot be loaded"):
        checkpoint.read_training_state(folder)


@pytest.mark.parametrize("field", ["data_fingerprint", "data_position", "bad_steps_total", "bad_steps_in_a_row"])
def test_a_progress_record_without_what_a_resume_reads_is_named(tmp_path: Path, field: str) -> None:
    saved = {"data_fingerprint": "f", "data_position": {}, "bad_steps_total": 0, "bad_steps_in_a_row": 0}
    checkpoint.require_resume_fields(saved, tmp_path)
    with pytest.raises(CheckpointError, match=f"has no `{field}` that a resume can read"):
        checkpoint.require_resume_fields({**saved, field: "zz" if field == "data_position" else None}, tmp_path)


def test_a_save_over_an_incomplete_folder_of_its_name_names_it_and_keeps_it(tmp_path: Path) -> None:
    """A damaged checkpoint-N (its trainer_state.json turned into a folder) is not a checkpoint to
    `--resume auto`; the save at step N then names it instead of saying "free space"."""
    damaged = tmp_path / "checkpoint-1"
    (damaged / "trainer_state.json").mkdir(parents=True)
    with pytest.raises(OutputError) as refused:
        checkpoint.save_checkpoint(
            tmp_path, 1, write_weights=lambda f: None, training_state={}, progress={"step": 1}, save_total_limit=None
        )
    assert "is there and is not a complete checkpoint" in refused.value.message
    assert refused.value.fix is not None and refused.value.fix.startswith(f"move {damaged} away")
    assert (damaged / "trainer_state.json").is_dir()


def test_the_fix_of_a_failed_save_fits_its_cause(tmp_path: Path) -> None:
    import errno
    import os

    for code, fix in ((errno.ENOSPC, "free space on that disk"), (errno.EROFS, "make the folder writable")):

        def fail(folder: Path, code: int = code) -> None:
            raise OSError(code, os.strerror(code), str(folder))

        with pytest.raises(OutputError) as failed:
            checkpoint.save_checkpoint(
                tmp_path, 1, write_weights=fail, training_state={}, progress={"step": 1}, save_total_limit=None
            )
        assert failed.value.fix is not None and failed.value.fix.startswith(fix)


def _saved_by(world: int, accumulation: int, batch: int = 2, *, global_batches: bool = True) -> dict:
    position = {"epoch": 0, "position": 8, "seed": 0, "order": 2, "world_size": world}
    if global_batches:
        position["global_batches"] = 4 * accumulation * world
    training = {"gradient_accumulation_steps": accumulation, "per_device_train_batch_size": batch}
    return {"world_size": world, "data_position": position, "profile": {"training": training}}


def _now(accumulation: int, batch: int = 2) -> dict:
    return {"training": {"gradient_accumulation_steps": accumulation, "per_device_train_batch_size": batch}}


def test_another_number_of_processes_resumes_when_a_step_keeps_its_micro_batches(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-4"
    assert checkpoint.check_world_change(folder, _saved_by(2, 1), _now(1), 2) is None
    said = checkpoint.check_world_change(folder, _saved_by(2, 1), _now(2), 1)
    assert said is not None and "of a 2-process run on 1" in said and "Not bit-exact" in said
    assert checkpoint.check_world_change(folder, _saved_by(2, 4), _now(1), 8) is not None


@pytest.mark.parametrize(
    ("saved", "now", "world", "fix"),
    [
        (_saved_by(2, 1), _now(1), 1, "`training.gradient_accumulation_steps=2`"),
        (_saved_by(2, 2), _now(1), 3, "divides 4: 1, 2, 4"),
        (_saved_by(2, 1), _now(2, batch=1), 1, "training.per_device_train_batch_size=2"),
        (_saved_by(2, 1, global_batches=False), _now(2), 1, "start 2 process(es)"),
    ],
)
def test_a_resume_on_another_number_of_processes_that_would_change_the_step_is_refused_with_the_fix(
    tmp_path: Path, saved: dict, now: dict, world: int, fix: str
) -> None:
    with pytest.raises(CheckFailed) as info:
        checkpoint.check_world_change(tmp_path / "checkpoint-4", saved, now, world)
    assert fix in (info.value.fix or "")


def test_a_process_the_saved_run_did_not_have_gets_no_random_states(tmp_path: Path) -> None:
    folder = _save(tmp_path, 5)
    state, rng = checkpoint.read_training_state(folder, 3)
    assert rng is None and state["optimizer"]["state"]
    assert checkpoint.read_training_state(folder, 0)[1] is not None
