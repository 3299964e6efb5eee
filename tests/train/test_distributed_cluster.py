"""Runs that survive a cluster, on this machine's CPU over gloo, under torchrun itself.

Two launchers with a c10d rendezvous on 127.0.0.1 are two nodes: they train what one process with
gradient accumulation 2 trains, and only the global rank 0 writes. A worker killed with SIGKILL under
``--max-restarts 1`` is restarted with the others, and ``--resume auto`` ends at the uninterrupted
run's weights, bit for bit. A preemption (SIGTERM to every worker, SIGKILL after a grace period)
saves when the grace holds a step and a save, and otherwise leaves the last complete checkpoint,
from which a later run ends at the uninterrupted weights.

Where a process must die or be signalled at a given point, a ``sitecustomize.py`` on its path
patches it at start-up, and the test waits for what it prints: no sleep that might be too short.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import SHAPES16_STEPS as STEPS
from helpers import assert_same_training, logged_losses, shapes16_overrides, weights_of, worker_env

from llavactl.data import cache
from llavactl.train import checkpoint

# Each test starts torchrun processes: seconds apiece.
pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# A run here takes under a minute; one that has not ended in this long hangs.
TIMEOUT_S = 240

# Rank 0 (the process that writes) dies after logging step 3, in torchrun's first start only.
KILL_RANK_0_AFTER_STEP_3 = """
import os
if os.environ.get("RANK") == "0" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    import signal
    from llavactl.train.metrics import MetricsWriter
    log = MetricsWriter.log
    def log_then_die(self, step, values):
        log(self, step, values)
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    MetricsWriter.log = log_then_die
"""

# Every save after checkpoint-2 writes its weights, then takes longer than any grace period.
SLOW_SAVES_AFTER_STEP_2 = """
import os
if os.environ.get("RANK") == "0":
    import time
    from llavactl.train import checkpoint
    save = checkpoint.save_checkpoint
    def slow_save(output_dir, step, *, write_weights, **kwargs):
        def write_then_wait(folder):
            write_weights(folder)
            if step > 2:
                print("test: a slow save has begun", flush=True)
                time.sleep(600)
        return save(output_dir, step, write_weights=write_then_wait, **kwargs)
    checkpoint.save_checkpoint = slow_save
"""

# Process 1's disk is full from the save of checkpoint-4 on: a file-size limit of 256 KiB (a shard
# of `tiny` with its AdamW state is over 1 MiB; what the processes print stays far below it).
FULL_DISK_ON_RANK_1_FROM_STEP_4 = """
import os
if os.environ.get("RANK") == "1":
    import resource, signal
    from llavactl.train import distributed
    save = distributed.save_sharded
    def save_on_a_full_disk(state, folder):
        if folder.name.endswith("checkpoint-4"):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        save(state, folder)
    distributed.save_sharded = save_on_a_full_disk
"""


def _hook(folder: Path, code: str) -> Path:
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(code)
    return folder


@dataclass
class Torchrun:
    """A torchrun this test started, ``-m llavactl train --profile tiny ... --resume auto``, writing
    every process's stdout and stderr into the file ``output``."""

    process: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def start(cls, options: list[str], overrides: list[str], output: Path, *hooks: Path, **env: str) -> Torchrun:
        command = [*TORCHRUN, *options, "-m", "llavactl", "train", "--profile", "tiny", *overrides, "--resume", "auto"]
        with output.open("wb") as sink:
            process = subprocess.Popen(command, env=worker_env(*hooks, **env), stdout=sink, stderr=subprocess.STDOUT)
        return cls(process, output)

    @classmethod
    def on_one_node(cls, overrides: list[str], output: Path, *hooks: Path, restarts: int) -> Torchrun:
        """`torchrun --standalone --nproc-per-node 2 --max-restarts RESTARTS`."""
        return cls.start(
            ["--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts)], overrides, output, *hooks
        )

    def said(self) -> str:
        """What the processes wrote, with Rich's line breaks as spaces."""
        return " ".join(self.output.read_text().split())

    def workers(self) -> list[int]:
        """The training processes torchrun runs (its children)."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        return [int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()]

    def kill(self) -> None:
        """SIGKILL torchrun and its workers (which run in sessions of their own), if it still runs."""
        if self.process.poll() is None:
            for pid in (self.process.pid, *self.workers()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def ended(self, within: float = TIMEOUT_S) -> int:
        """Its exit code, once it has ended; killed, and the test failed, when it has not within ``within`` s."""
        try:
            return self.process.wait(timeout=within)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"torchrun did not end within {within:.0f} s: {self.said()}") from None

    def succeeded(self) -> str:
        """What the processes wrote, once torchrun has ended with exit code 0."""
        assert self.ended() == 0, self.said()
        return self.said()

    def wait_for(self, *texts: str) -> str:
        """What the processes wrote, once it holds every one of ``texts``."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            if all(text in (said := self.said()) for text in texts):
                return said
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        code = self.process.poll()
        self.kill()
        how = f"ended with exit code {code}" if code is not None else f"ran {TIMEOUT_S} s"
        raise AssertionError(f"torchrun {how} without writing {texts}: {self.said()}")


@pytest.fixture(scope="module")
def uninterrupted(shapes16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run the tests below interrupt, from start to end: 4 steps, checkpoints at 2 and 4."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    Torchrun.on_one_node(shapes16_overrides(shapes16, folder / "run"), folder / "output", restarts=1).succeeded()
    return folder / "run"


def _assert_ends_as(run: Path, uninterrupted: Path) -> None:
    """``run`` ended with the uninterrupted run's weights, bit for bit, and logged its losses."""
    after, whole = weights_of(run / f"checkpoint-{STEPS}"), weights_of(uninterrupted / f"checkpoint-{STEPS}")
    assert after.keys() == whole.keys() and all(torch.equal(after[k], whole[k]) for k in whole)
    assert logged_losses(run) == logged_losses(uninterrupted)


# ------------------------------------------------------------------ several nodes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def big16(shapes16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 16 records in a file the data cache keeps an index of: 4 MiB of spaces after the JSON list."""
    folder = tmp_path_factory.mktemp("big16")
    (folder / "images").symlink_to(shapes16.parent / "images")
    data = folder / shapes16.name
    data.write_text(shapes16.read_text() + " " * cache.CACHE_MIN_BYTES)
    return data


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_nodes_train_what_one_process_with_accumulation_2_trains_and_rank_0_writes(
    big16: Path, one_process: Path, tmp_path: Path, strategy: str
) -> None:
    run = tmp_path / "run"
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", strategy]
    options = ["--nnodes", "2", "--nproc-per-node", "1", *rendezvous, "--max-restarts", "1"]
    overrides = shapes16_overrides(big16, run, f"training.distributed={strategy}")
    # Each node has a cache of its own, as separate machines do.
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    nodes = [Torchrun.start(options, overrides, c.with_suffix(".out"), LLAVACTL_CACHE=str(c)) for c in caches]
    try:
        said = [node.succeeded() for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert_same_training(one_process, run)
    # The node c10d gave global rank 0 logs and saves; the other's process says nothing of saving.
    [main] = [s for s in said if "Saved " in s]
    assert f"Training on 2 processes ({strategy} over gloo)" in main
    assert len(logged_losses(run)) == STEPS  # one metrics writer
    # Each node scanned the data for its process, once, into its own cache.
    assert [len(list((c / "records").glob("*.npy"))) for c in caches] == [1, 1]
    # With restarts allowed across nodes, doctor says how to keep a restart from hanging.
    assert "(pytorch/pytorch#135712). Fix: `export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`" in main


# ------------------------------------------------------------------ restarts


def test_a_worker_killed_mid_run_is_restarted_and_the_run_ends_with_the_uninterrupted_weights(
    shapes16: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    hook = _hook(tmp_path / "hook", KILL_RANK_0_AFTER_STEP_3)
    run = tmp_path / "run"
    said = Torchrun.on_one_node(shapes16_overrides(shapes16, run), tmp_path / "output", hook, restarts=1).succeeded()
    assert said.count("Training on 2 processes") == 2, said  # started again...
    assert f"checkpoint-2 at step 2/{STEPS}" in said, said  # ... from the last checkpoint
    assert "Traceback" not in said and "Exception ignored" not in said, said
    _assert_ends_as(run, uninterrupted)


# ------------------------------------------------------------------ preemption


def _last_logged_step(run: Path) -> int:
    return int(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"])


def test_a_preemption_whose_grace_holds_a_step_and_a_save_saves_after_the_signal(
    shapes16: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    settings = shapes16_overrides(shapes16, run, "training.max_steps=400", "training.save_steps=1000")
    torchrun = Torchrun.on_one_node(settings, tmp_path / "output", restarts=0)
    torchrun.wait_for("step 1/400")
    logged = _last_logged_step(run)
    for pid in torchrun.workers():
        os.kill(pid, signal.SIGTERM)
    torchrun.ended(within=120)  # the grace period: long enough for a step and a save
    said = torchrun.said()
    [saved] = checkpoint.list_checkpoints(run)
    step = checkpoint.checkpoint_step(saved)
    assert step is not None and logged < step <= logged + 2, said  # the step that was running, or the next
    assert "If this process is killed before the save completes, the run has no checkpoint yet" in said
    assert f"Saved {saved} " in said and f"checkpoint-{step} complete " in said, said
    assert " s after the stop signal" in said, said
    checkpoint.verify_checkpoint(saved)


def test_a_preemption_whose_grace_is_too_short_for_the_save_leaves_the_last_checkpoint_to_resume_from(
    shapes16: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    hook = _hook(tmp_path / "hook", SLOW_SAVES_AFTER_STEP_2)
    run = tmp_path / "run"
    torchrun = Torchrun.on_one_node(shapes16_overrides(shapes16, run), tmp_path / "output", hook, restarts=0)
    torchrun.wait_for(f"step 3/{STEPS}")  # checkpoint-2 is complete
    for pid in torchrun.workers():
        os.kill(pid, signal.SIGTERM)
    said = torchrun.wait_for("checkpoint-2 stays the last complete checkpoint", "test: a slow save has begun")
    torchrun.kill()  # the grace period is over
    assert "after the stop signal" not in said
    assert checkpoint.list_checkpoints(run) == [run / "checkpoint-2"]
    checkpoint.verify_checkpoint(run / "checkpoint-2")
    assert list(run.glob(f"{checkpoint.TMP_PREFIX}*"))  # the save that was cut short: no checkpoint
    # The job's next start continues from checkpoint-2 and trains what the uninterrupted run trained.
    said = Torchrun.on_one_node(shapes16_overrides(shapes16, run), tmp_path / "resumed", restarts=0).succeeded()
    assert f"checkpoint-2 at step 2/{STEPS}" in said, said
    _assert_ends_as(run, uninterrupted)


# ------------------------------------------------------------------ a full disk


def test_a_shard_that_cannot_be_written_fails_the_save_on_every_process_and_leaves_the_last_checkpoint(
    shapes16: Path, tmp_path: Path
) -> None:
    hook = _hook(tmp_path / "hook", FULL_DISK_ON_RANK_1_FROM_STEP_4)
    run = tmp_path / "run"
    settings = shapes16_overrides(shapes16, run, "training.distributed=fsdp")
    torchrun = Torchrun.on_one_node(settings, tmp_path / "output", hook, restarts=0)
    assert torchrun.ended() != 0
    said = torchrun.said()
    failed = f"Saving {run / 'checkpoint-4'} failed: a file was cut short, as on a full disk or past a file-size limit"
    assert said.count(failed) == 2, said  # process 1's own error, and process 0 says it too
    assert "the checkpoints saved before it are intact. Fix: free space on that disk" in said, said
    workers_said = said.split("failed (exitcode: 2)")[0]  # before torchrun's own report (and traceback)
    assert "Traceback" not in workers_said, said
    assert checkpoint.list_checkpoints(run) == [run / "checkpoint-2"]
    checkpoint.verify_checkpoint(run / "checkpoint-2")
    assert not list(run.glob(f"{checkpoint.TMP_PREFIX}*"))  # the staged shards were removed
    # With space again, the same command continues from checkpoint-2 to the end.
    said = Torchrun.on_one_node(settings, tmp_path / "resumed", restarts=0).succeeded()
    assert f"checkpoint-2 at step 2/{STEPS}" in said, said
    checkpoint.verify_checkpoint(run / f"checkpoint-{STEPS}")


def test_a_worker_killed_on_one_of_two_nodes_is_restarted_with_a_store_of_each_restart(
    shapes16: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    hook = _hook(tmp_path / "hook", KILL_RANK_0_AFTER_STEP_3)
    run = tmp_path / "run"
    rendezvous = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "restart"]
    options = ["--nnodes", "2", "--nproc-per-node", "1", *rendezvous, "--max-restarts", "1"]
    overrides = shapes16_overrides(shapes16, run)
    nodes = [
        Torchrun.start(options, overrides, tmp_path / f"node{n}.out", hook, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        for n in range(2)
    ]
    try:
        said = " ".join(node.succeeded() for node in nodes)
    finally:
        for node in nodes:
            node.kill()
    assert f"checkpoint-2 at step 2/{STEPS}" in said, said
    assert "#135712" not in said  # a store of each restart: doctor has nothing to warn of
    _assert_ends_as(run, uninterrupted)
