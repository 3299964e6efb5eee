"""Two CPU processes over gloo (started by `llavactl train --nproc-per-node 2`, i.e. torchrun) train
exactly what one process with gradient accumulation 2 trains, with DDP and with FSDP2, and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SHAPES16_STEPS as STEPS
from helpers import (
    assert_same_training,
    logged_losses,
    shapes16_overrides,
    train_on_two_processes,
    train_recipe,
    weights_of,
)

from llavactl.errors import CheckFailed
from llavactl.model import weights
from llavactl.train import checkpoint

# Each test starts torchrun processes: seconds apiece.
pytestmark = pytest.mark.slow


def _train_here(overrides: list[str], *, resume: str | None = None) -> None:
    train_recipe(overrides, resume=resume)


@pytest.fixture(scope="module")
def ddp(shapes16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two processes, micro-batches of 2 each, no accumulation: 4 records a step."""
    out = tmp_path_factory.mktemp("ddp")
    return out, train_on_two_processes(shapes16_overrides(shapes16, out))


def test_two_ddp_processes_train_what_one_process_with_accumulation_2_trains(
    one_process: Path, ddp: tuple[Path, str]
) -> None:
    out, stdout = ddp
    assert_same_training(one_process, out)
    assert "Training on 2 processes (ddp over gloo)" in stdout
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in stdout
    assert stdout.count("Loading model:") == 1  # rank 1 prints nothing
    assert len(logged_losses(out)) == STEPS  # one metrics writer
    run = json.loads((out / "run.json").read_text())
    assert run["world"] == {"size": 2, "backend": "gloo", "strategy": "ddp"}
    assert checkpoint.read_progress(out / "checkpoint-2")["world_size"] == 2


def test_each_process_has_its_own_random_stream_saved(ddp: tuple[Path, str]) -> None:
    folder = ddp[0] / "checkpoint-2"
    _, rank0 = checkpoint.read_training_state(folder, 0)
    _, rank1 = checkpoint.read_training_state(folder, 1)
    assert not torch.equal(rank0["torch"], rank1["torch"])


def test_two_process_run_resumes_exactly(shapes16: Path, ddp: tuple[Path, str], tmp_path: Path) -> None:
    whole = ddp[0]
    shutil.copytree(whole / "checkpoint-2", tmp_path / "checkpoint-2")
    train_on_two_processes(shapes16_overrides(shapes16, tmp_path), "--resume", "auto")
    resumed, uninterrupted = weights_of(tmp_path / f"checkpoint-{STEPS}"), weights_of(whole / f"checkpoint-{STEPS}")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert logged_losses(tmp_path) == logged_losses(whole)[2:]


def test_resuming_on_another_number_of_processes_that_changes_the_step_is_refused(
    shapes16: Path, ddp: tuple[Path, str]
) -> None:
    saved = ddp[0] / "checkpoint-2"
    with pytest.raises(CheckFailed, match="whose steps are 2 micro-batches of 2") as info:
        _train_here(shapes16_overrides(shapes16, ddp[0]), resume=str(saved))
    assert "training.gradient_accumulation_steps=2" in (info.value.fix or "")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_on_one_and_one_on_two(
    shapes16: Path, one_process: Path, tmp_path: Path, strategy: str
) -> None:
    # Two processes save at step 2; one process with accumulation 2 goes on: the same steps, the
    # records of the epoch each once, so close to the uninterrupted one-process run.
    kind = f"training.distributed={strategy}"
    two, one = tmp_path / "two", tmp_path / "one"
    train_on_two_processes(shapes16_overrides(shapes16, two, kind))
    shutil.copytree(two / "checkpoint-2", one / "checkpoint-2")
    _, said = train_recipe(
        shapes16_overrides(shapes16, one, kind, "training.gradient_accumulation_steps=2"), resume="auto"
    )
    assert "Resuming checkpoint-2 of a 2-process run on 1" in " ".join(said.split())
    assert_same_training(one_process, one, steps=(3, 4))
    # ... and back: one process's checkpoint-2 (of the reference run) resumed on two.
    back = tmp_path / "back"
    shutil.copytree(one_process / "checkpoint-2", back / "checkpoint-2")
    if strategy == "ddp":
        stdout = train_on_two_processes(shapes16_overrides(shapes16, back), "--resume", "auto")
        assert "of a 1-process run on 2" in " ".join(stdout.split())
        assert_same_training(one_process, back, steps=(3, 4))


def test_two_fsdp_processes_train_the_same_save_shards_and_resume_exactly(
    shapes16: Path, one_process: Path, tmp_path: Path
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    stdout = train_on_two_processes(shapes16_overrides(shapes16, whole, "training.distributed=fsdp"))
    assert "Training on 2 processes (fsdp over gloo)" in stdout
    # Each process's shards, read back whole: the single-process run's names and shapes and values.
    assert weights.is_sharded(whole / "checkpoint-2")
    assert {p.name for p in (whole / "checkpoint-2").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert_same_training(one_process, whole)
    # The weights and AdamW state go back into each process's shards.
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    train_on_two_processes(shapes16_overrides(shapes16, resumed, "training.distributed=fsdp"), "--resume", "auto")
    after, uninterrupted = weights_of(resumed / f"checkpoint-{STEPS}"), weights_of(whole / f"checkpoint-{STEPS}")
    assert all(torch.equal(after[k], uninterrupted[k]) for k in uninterrupted)


def test_a_process_whose_records_were_all_skipped_still_trains_in_step(shapes16: Path, tmp_path: Path) -> None:
    # Batches of one record: the record at place 3 of the order is rank 1's whole share of step 2.
    # That process joins the gradient reduction with a zero-weighted batch; the two processes
    # must still train what one process does with that record skipped.
    from llavactl.data.dataset import ResumableSampler

    records = json.loads(shapes16.read_text())
    bad = ResumableSampler([0] * len(records), 1, seed=0).order(0)[3]
    records[bad]["image"] = "images/missing.png"
    data = tmp_path / "data" / "bad.json"
    shutil.copytree(shapes16.parent, data.parent)
    data.write_text(json.dumps(records))
    common = ("data.on_error=skip", "training.per_device_train_batch_size=1")
    _train_here(shapes16_overrides(data, tmp_path / "one", *common, "training.gradient_accumulation_steps=2"))
    train_on_two_processes(shapes16_overrides(data, tmp_path / "two", *common))
    assert_same_training(tmp_path / "one", tmp_path / "two")


def _start_two_processes(shapes16: Path, out: Path) -> subprocess.Popen[str]:
    """`llavactl train --nproc-per-node 2` in the background, once its first step is logged."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    settings = shapes16_overrides(shapes16, out, "training.max_steps=400", "training.save_steps=1000")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "llavactl", "train", "--profile", "tiny", *settings, "--nproc-per-node", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert launcher.stdout is not None
    for line in launcher.stdout:
        if line.startswith("step "):
            return launcher
    raise AssertionError(f"no step was logged: {launcher.communicate()}")


def test_sigterm_to_the_launcher_saves_once_and_exits_143_without_a_traceback(shapes16: Path, tmp_path: Path) -> None:
    launcher = _start_two_processes(shapes16, tmp_path)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 143, out + err
    assert out.count("Saved ") == 1 and "Traceback" not in err, out + err
    [saved] = checkpoint.list_checkpoints(tmp_path)
    assert checkpoint.read_progress(saved)["step"] < 400


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the launcher's children from /proc")
def test_workers_stop_within_seconds_when_the_launcher_is_killed(shapes16: Path, tmp_path: Path) -> None:
    launcher = _start_two_processes(shapes16, tmp_path)
    task = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    workers = [int(pid) for pid in task.read_text().split()]
    assert len(workers) == 2
    launcher.kill()  # kill -9: nothing of the launcher runs any more
    launcher.communicate()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "workers went on training"
    # They stopped as on SIGTERM: after the step, with a checkpoint.
    assert checkpoint.list_checkpoints(tmp_path)


def test_a_failing_process_ends_the_run_with_its_code_and_the_others_say_why(shapes16: Path, tmp_path: Path) -> None:
    # Process 1 stops with a data error at its third step (patched in at start-up by sitecustomize).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import llavactl.train.step as step\n"
        "    from llavactl.errors import DataError\n"
        "    real, calls = step.TrainingStep.__call__, []\n"
        "    def failing(self, micro_batches):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            raise DataError('record 7: made up for the test', fix='none')\n"
        "        return real(self, micro_batches)\n"
        "    step.TrainingStep.__call__ = failing\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")])))
    settings = shapes16_overrides(shapes16, tmp_path / "run", "training.max_steps=8")
    done = subprocess.run(
        [sys.executable, "-m", "llavactl", "train", "--profile", "tiny", *settings, "--nproc-per-node", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    err = " ".join(done.stderr.split())
    assert "record 7: made up for the test" in err
    assert "Process 0 stopped: another process of this 2-process run ended" in err and "Internal error" not in err


def test_padding_free_ddp_and_fsdp_processes_train_what_one_process_trains(shapes16: Path, tmp_path: Path) -> None:
    packed = ("data.padding_free=true",)
    _train_here(shapes16_overrides(shapes16, tmp_path / "one", *packed, "training.gradient_accumulation_steps=2"))
    train_on_two_processes(shapes16_overrides(shapes16, tmp_path / "ddp", *packed))
    train_on_two_processes(shapes16_overrides(shapes16, tmp_path / "fsdp", *packed, "training.distributed=fsdp"))
    assert_same_training(tmp_path / "one", tmp_path / "ddp")
    assert_same_training(tmp_path / "one", tmp_path / "fsdp")
