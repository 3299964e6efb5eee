"""A run folder belongs to one run: a second run is refused or moves the old one aside, a live lock
stops a second process, a stale one is taken over, and an unusable folder is named before loading."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, train_recipe

from llavactl.errors import ConfigError
from llavactl.train.run_folder import LOCK_FILE, RunFolderLock


def _settings(shapes: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.data_path={shapes}", f"training.output_dir={out}", "training.max_steps=2", *extra]


def test_a_second_run_without_resume_is_refused_with_the_choices(shapes: Path, tmp_path: Path) -> None:
    train_recipe(_settings(shapes, tmp_path))
    with pytest.raises(ConfigError) as refused:
        train_recipe(_settings(shapes, tmp_path))
    assert "already holds a run" in refused.value.message
    assert "--resume auto" in refused.value.fix and "--start-over" in refused.value.fix
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / LOCK_FILE).exists()
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "completed"  # the old run's, untouched


def test_start_over_moves_the_old_run_aside_and_deletes_nothing(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    train_recipe(_settings(shapes, out))
    old_weights = (out / "checkpoint-2" / "trainable.safetensors").read_bytes()
    code, text, err = run_cli(
        [
            "train",
            "--profile",
            "tiny",
            *_settings(shapes, out, "training.max_steps=1"),
            "--start-over",
            "--skip-doctor",
        ],
        capsys,
    )
    assert code == 0, err
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert "aside to" in text and (aside / "checkpoint-2" / "trainable.safetensors").read_bytes() == old_weights
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_resuming_another_folder_s_checkpoint_into_a_folder_holding_a_run_is_refused(
    shapes: Path, tmp_path: Path
) -> None:
    """The other run's checkpoints would be mixed with this one's, and pruned by its retention."""
    first, second = tmp_path / "first", tmp_path / "second"
    train_recipe(_settings(shapes, first, "training.save_steps=1"))
    train_recipe(_settings(shapes, second, "seed=7"))
    before = sorted(p.name for p in second.iterdir())
    with pytest.raises(ConfigError) as refused:
        train_recipe(_settings(shapes, second, "training.max_steps=3"), resume=str(first / "checkpoint-1"))
    assert "is not one of training.output_dir" in refused.value.message and "holds another run" in refused.value.message
    assert sorted(p.name for p in second.iterdir()) == before
    # Into an empty folder, a run may start from another folder's checkpoint (a branch of that run).
    branch = tmp_path / "branch"
    train_recipe(_settings(shapes, branch, "training.max_steps=3"), resume=str(first / "checkpoint-1"), force=True)
    assert sorted(p.name for p in branch.glob("checkpoint-*")) == ["checkpoint-3"]


def test_resuming_an_older_checkpoint_moves_the_later_ones_aside(shapes: Path, tmp_path: Path) -> None:
    """They belong to the history the resume replaces: left in place, the new run's saves at those steps
    were skipped, and `--resume auto` and export took the old run's weights for the new run's."""
    out = tmp_path / "run"
    keep_all = (
        "training.max_steps=4",
        "training.save_steps=1",
        "training.save_total_limit=null",
        "training.logging_steps=1",
    )
    train_recipe(_settings(shapes, out, *keep_all))
    old_final = (out / "checkpoint-4" / "trainable.safetensors").read_bytes()
    changed = _settings(shapes, out, *keep_all, "training.learning_rate=1e-5")
    train_recipe(changed, resume=str(out / "checkpoint-2"), force=True)
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("run.after-step-2-")]
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert (aside / "checkpoint-4" / "trainable.safetensors").read_bytes() == old_final
    assert (out / "checkpoint-4" / "trainable.safetensors").read_bytes() != old_final
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_live_lock_stops_a_second_run_and_a_stale_one_is_taken_over(shapes: Path, tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(ConfigError) as busy:
            train_recipe(_settings(shapes, tmp_path))
        assert f"process {live.pid} on {socket.gethostname()}" in busy.value.message
        assert not (tmp_path / "run.json").exists()
    finally:
        live.kill()
        live.wait()
    # The holder is gone (a kill -9 leaves its lock behind): the next run takes the lock over.
    result, _ = train_recipe(_settings(shapes, tmp_path))
    assert result.status == "completed" and not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_another_machine_is_never_taken_over(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with pytest.raises(ConfigError) as busy:
        RunFolderLock(tmp_path).acquire()
    assert "process 1 on elsewhere, started then" in busy.value.message
    assert str(tmp_path / LOCK_FILE) in busy.value.fix


def test_the_lock_names_this_process_and_goes_with_release(tmp_path: Path) -> None:
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_an_output_folder_that_is_a_file_is_named_before_anything_loads(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out, err = run_cli(
        ["train", "--profile", "tiny", *_settings(shapes, blocker / "run"), "--skip-doctor"], capsys
    )
    assert code == 2 and "Loading model" not in out
    assert f"training.output_dir `{blocker / 'run'}` cannot be written" in " ".join(err.split())


def test_a_damaged_checkpoint_is_named_by_train_export_and_predict(
    shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    train_recipe(_settings(shapes, out, "training.max_steps=4", "training.save_steps=2"))
    weights = out / "checkpoint-4" / "trainable.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # right size, wrong bytes: would load as zeros
    image = shapes.parent / "images" / "000000.png"
    for args in (
        ["train", "--profile", "tiny", *_settings(shapes, out, "training.max_steps=4"), "--resume", "auto"],
        ["export", str(out), str(tmp_path / "exported")],
        ["predict", "--model", str(out), "--image", str(image)],
    ):
        code, _, err = run_cli([*args, *(["--skip-doctor"] if args[0] == "train" else [])], capsys)
        err = " ".join(err.split())
        assert code == 2, err
        assert "checkpoint-4 is damaged: trainable.safetensors does not hold the bytes it was saved with" in err
        assert f"The newest intact checkpoint is {out / 'checkpoint-2'}" in err and "Internal error" not in err


def _take_lock(folder: str, tried: object, done: object) -> None:
    tried.wait()  # type: ignore[attr-defined]  # all try at once
    try:
        RunFolderLock(Path(folder)).acquire()
    except ConfigError:
        done.wait()  # type: ignore[attr-defined]
        return
    (Path(folder) / f"won-{os.getpid()}").touch()
    done.wait()  # type: ignore[attr-defined]  # the lock is held until every process has tried


def test_processes_taking_over_a_stale_lock_together_never_both_hold_it(tmp_path: Path) -> None:
    """Two `--resume auto` jobs requeued together after a crash: one trains, the other is refused."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(8):
        folder = tmp_path / str(trial)
        folder.mkdir()
        (folder / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname()}))
        tried, done = context.Barrier(4), context.Barrier(4)
        processes = [context.Process(target=_take_lock, args=(str(folder), tried, done)) for _ in range(4)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        holders = list(folder.glob("won-*"))
        assert len(holders) == 1, f"trial {trial}: {len(holders)} processes held the lock"


def test_resume_and_start_over_together_are_refused_before_anything_runs(tmp_path: Path) -> None:
    code, _, err = run_cli(
        ["train", "-p", "tiny", f"training.output_dir={tmp_path}", "--resume", "auto", "--start-over"]
    )
    assert code == 2 and "--resume auto and --start-over ask for opposite things" in err
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_written_into_a_checkpoint_folder(shapes: Path, tmp_path: Path) -> None:
    """A run or an export inside checkpoint-N mixes its files with the checkpoint's (and retention
    deletes them with it)."""
    train_recipe(_settings(shapes, tmp_path / "run"))
    inside = tmp_path / "run" / "checkpoint-2" / "sub"
    with pytest.raises(ConfigError, match="is inside the checkpoint folder"):
        train_recipe(_settings(shapes, inside))
    code, _, err = run_cli(["export", str(tmp_path / "run"), str(inside)])
    assert code == 2 and f"The export folder `{inside}` is inside the checkpoint folder" in err
    assert not inside.exists()
    code, _, err = run_cli(["predict", "--model", str(tmp_path / "nope"), "--image", "x.png", "--prompt", "q"])
    assert code == 2 and f"`{tmp_path / 'nope'}` does not exist." in err


def test_a_metrics_file_that_is_a_folder_is_named_on_resume(shapes: Path, tmp_path: Path) -> None:
    train_recipe(_settings(shapes, tmp_path))
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    code, _, err = run_cli(
        [
            "train",
            "-p",
            "tiny",
            *_settings(shapes, tmp_path, "training.max_steps=3"),
            "--resume",
            "auto",
            "--force",
            "--skip-doctor",
        ]
    )
    assert code == 2 and f"{tmp_path / 'metrics.jsonl'} cannot be written: Is a directory" in " ".join(err.split())
    assert "make" in err and "free space" not in err


def test_a_lock_path_that_is_a_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).mkdir()
    with pytest.raises(ConfigError, match=r"its lock file .* cannot be opened \(Is a directory\)"):
        RunFolderLock(tmp_path).acquire()
