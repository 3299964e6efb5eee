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
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import train_recipe
from safetensors.torch import load_file

from llavactl.errors import CheckFailed
from llavactl.model import weights
from llavactl.train import checkpoint
from llavactl.train.runs import load_checkpoint

STEPS = 4
WEIGHT_FILES = ("trainable.safetensors", "projector.safetensors")


# Each test starts torchrun processes: seconds apiece.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shapes16(shapes_data: Callable[..., Path]) -> Path:
    # 16 records: 4 steps of 4 records, one epoch; batches of 2 shared by 2 processes leave none out.
    return shapes_data(16)


def _overrides(shapes16: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.data_path={shapes16}",
        f"training.output_dir={output_dir}",
        "training.per_device_train_batch_size=2",
        "training.learning_rate=1e-2",
        f"training.max_steps={STEPS}",
        "training.warmup_ratio=0",
        "training.warmup_steps=1",
        "training.logging_steps=1",
        "training.save_steps=2",
        *extra,
    ]


def _train_here(overrides: list[str], *, resume: str | None = None) -> None:
    train_recipe(overrides, resume=resume)


def _train_on_two_processes(overrides: list[str], *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # the children share two cores
    command = [sys.executable, "-m", "llavactl", "train", "--profile", "tiny", *overrides, *args]
    done = subprocess.run(
        [*command, "--nproc-per-node", "2"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The trained weights of a checkpoint: its safetensors files, or its shards read whole."""
    if not weights.is_sharded(folder):
        return {k: v for f in WEIGHT_FILES for k, v in load_file(folder / f).items()}
    assembled, _, _ = load_checkpoint(folder)
    return {name: p.detach() for name, p in assembled.model.named_parameters() if name in _trained_names(folder)}


def _trained_names(folder: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key[len("weights.") :] for key in keys if key.startswith("weights.")}


def _losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(shapes16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, micro-batches of 2, accumulation 2: 4 records a step."""
    out = tmp_path_factory.mktemp("one")
    _train_here(_overrides(shapes16, out, "training.gradient_accumulation_steps=2"))
    return out


@pytest.fixture(scope="module")
def ddp(shapes16: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two processes, micro-batches of 2 each, no accumulation: 4 records a step."""
    out = tmp_path_factory.mktemp("ddp")
    return out, _train_on_two_processes(_overrides(shapes16, out))


def _assert_same_training(one: Path, two: Path, steps: tuple[int, ...] = tuple(range(1, STEPS + 1))) -> None:
    single, double = _weights(one / f"checkpoint-{STEPS}"), _weights(two / f"checkpoint-{STEPS}")
    assert single.keys() == double.keys()
    # Two processes sum gradients in another order than one process accumulating: float noise of
    # ~1e-7. AdamW divides each gradient by its own running size, so where a gradient is near zero
    # (a tower's k_proj bias has none in exact arithmetic) the noise grows to up to 8e-4 after 4
    # steps at lr 1e-2; leaving one record of the 16 out changes weights by 0.03.
    assert max((single[k] - double[k]).abs().max().item() for k in single) < 1e-3
    # ... and the weights did move: the comparison is not between two untrained models.
    assert any(not torch.equal(single[k], _weights(one / "checkpoint-2")[k]) for k in single)
    assert _losses(two) == pytest.approx([_losses(one)[k - 1] for k in steps], rel=1e-6)


def test_two_ddp_processes_train_what_one_process_with_accumulation_2_trains(
    one_process: Path, ddp: tuple[Path, str]
) -> None:
    out, stdout = ddp
    _assert_same_training(one_process, out)
    assert "Training on 2 processes (ddp over gloo)" in stdout
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in stdout
    assert stdout.count("Loading model:") == 1  # rank 1 prints nothing
    assert len(_losses(out)) == STEPS  # one metrics writer
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
    _train_on_two_processes(_overrides(shapes16, tmp_path), "--resume", "auto")
    resumed, uninterrupted = _weights(tmp_path / f"checkpoint-{STEPS}"), _weights(whole / f"checkpoint-{STEPS}")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert _losses(tmp_path) == _losses(whole)[2:]


def test_resuming_on_another_number_of_processes_that_changes_the_step_is_refused(
    shapes16: Path, ddp: tuple[Path, str]
) -> None:
    saved = ddp[0] / "checkpoint-2"
    with pytest.raises(CheckFailed, match="whose steps are 2 micro-batches of 2") as info:
        _train_here(_overrides(shapes16, ddp[0]), resume=str(saved))
    assert "training.gradient_accumulation_steps=2" in (info.value.fix or "")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_on_one_and_one_on_two(
    shapes16: Path, one_process: Path, tmp_path: Path, strategy: str
) -> None:
    # Two processes save at step 2; one process with accumulation 2 goes on: the same steps, the
    # records of the epoch each once, so close to the uninterrupted one-process run.
    kind = f"training.distributed={strategy}"
    two, one = tmp_path / "two", tmp_path / "one"
    _train_on_two_processes(_overrides(shapes16, two, kind))
    shutil.copytree(two / "checkpoint-2", one / "checkpoint-2")
    _, said = train_recipe(
        _overrides(shapes16, one, kind, "training.gradient_accumulation_steps=2"), resume="auto"
    )
    assert "Resuming checkpoint-2 of a 2-process run on 1" in " ".join(said.split())
    _assert_same_training(one_process, one, steps=(3, 4))
    # ... and back: one process's checkpoint-2 (of the reference run) resumed on two.
    back = tmp_path / "back"
    shutil.copytree(one_process / "checkpoint-2", back / "checkpoint-2")
    if strategy == "ddp":
        stdout = _train_on_two_processes(_overrides(shapes16, back), "--resume", "auto")
        assert "of a 1-process run on 2" in " ".join(stdout.split())
        _assert_same_training(one_process, back, steps=(3, 4))


def test_two_fsdp_processes_train_the_same_save_whole_weights_and_resume_exactly(
    shapes16: Path, one_process: Path, tmp_path: Path
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    stdout = _train_on_two_processes(_overrides(shapes16, whole, "training.distributed=fsdp"))
    assert "Training on 2 processes (fsdp over gloo)" in stdout
    # Whole tensors in the single-process layout: the same keys and shapes, loadable anywhere.
    _assert_same_training(one_process, whole)
    # The sharded optimizer state goes back into the shards from the whole one.
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    _train_on_two_processes(_overrides(shapes16, resumed, "training.distributed=fsdp"), "--resume", "auto")
    after, uninterrupted = _weights(resumed / f"checkpoint-{STEPS}"), _weights(whole / f"checkpoint-{STEPS}")
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
    _train_here(_overrides(data, tmp_path / "one", *common, "training.gradient_accumulation_steps=2"))
    _train_on_two_processes(_overrides(data, tmp_path / "two", *common))
    _assert_same_training(tmp_path / "one", tmp_path / "two")


def _start_two_processes(shapes16: Path, out: Path) -> subprocess.Popen[str]:
    """`llavactl train --nproc-per-node 2` in the background, once its first step is logged."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    settings = _overrides(shapes16, out, "training.max_steps=400", "training.save_steps=1000")
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
    settings = _overrides(shapes16, tmp_path / "run", "training.max_steps=8")
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
    _train_here(_overrides(shapes16, tmp_path / "one", *packed, "training.gradient_accumulation_steps=2"))
    _train_on_two_processes(_overrides(shapes16, tmp_path / "ddp", *packed))
    _train_on_two_processes(_overrides(shapes16, tmp_path / "fsdp", *packed, "training.distributed=fsdp"))
    _assert_same_training(tmp_path / "one", tmp_path / "ddp")
    _assert_same_training(tmp_path / "one", tmp_path / "fsdp")
