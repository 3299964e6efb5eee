"""A run folder read back for a person: its state, progress, figures over the steps and checkpoints.

``llavactl runs`` reads what a run leaves in its folder — ``run.json`` (written at the start, and
again when the run ends), ``metrics.jsonl`` (one line per logging step), the lock file of a live
run and its ``checkpoint-N`` folders — and never writes there: a run that is training goes on
undisturbed, and a line it is writing (the torn last line of ``metrics.jsonl``) is passed over.

The state comes from ``run.json``'s status and the lock: ``running`` while the process that holds the
lock is alive (on another host it cannot be looked at, and is taken at its word); a run whose record
still says running but whose process is gone was killed without a word (``interrupted``, saying so).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from llavactl.errors import DataError
from llavactl.system import process_alive
from llavactl.train.checkpoint import MANIFEST_FILE, STATE_FILE, checkpoint_step, damage, flatten, list_checkpoints
from llavactl.train.metrics import METRICS_FILE, RUN_FILE
from llavactl.train.run_folder import LOCK_FILE, RUN_FILES

State = Literal["running", "finished", "failed", "interrupted", "starting"]
# How much of the end of metrics.jsonl `runs list` reads for the last line (a line is ~400 bytes).
TAIL_BYTES = 64 << 10
# How deep under DIR `runs list` looks for run folders (DIR/project/run is two levels).
SEARCH_DEPTH = 3
# The figures `runs show` charts besides MFU, in this order, with their labels.
CHARTED = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"), ("samples_per_s", "samples/s"))


@dataclass(frozen=True)
class CheckpointState:
    """One ``checkpoint-N`` folder: complete (its manifest lists its files) and, when asked, verified
    (every file has the size and checksum it was saved with; None when not checked)."""

    path: str
    step: int | None
    complete: bool
    verified: bool | None = None
    problem: str | None = None


@dataclass(frozen=True)
class RunState:
    """What ``runs list`` shows of one run folder."""

    folder: str
    state: State
    detail: str | None  # the failed run's first error line; who holds a running run; why interrupted
    pid: int | None
    host: str | None
    profile: str | None
    stage: str | None
    step: int | None
    total_steps: int | None
    last_loss: float | None
    samples_per_s: float | None
    last_checkpoint: str | None
    updated_at: float  # seconds since the epoch of the newest file the run wrote
    global_batch: int | None = None  # records per optimizer step over every process

    @property
    def saved_step(self) -> int | None:
        """The step of the last complete checkpoint."""
        return checkpoint_step(Path(self.last_checkpoint)) if self.last_checkpoint else None

    @property
    def updated_ago_s(self) -> float:
        return max(0.0, time.time() - self.updated_at)

    @property
    def eta_s(self) -> float | None:
        """Seconds to the last step of a running run, at its last logged speed."""
        if self.state != "running" or None in (self.step, self.total_steps, self.samples_per_s, self.global_batch):
            return None
        assert self.step is not None and self.total_steps is not None and self.samples_per_s and self.global_batch
        return max(0, self.total_steps - self.step) * self.global_batch / self.samples_per_s

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "updated_ago_s": round(self.updated_ago_s, 1), "eta_s": self.eta_s}


@dataclass(frozen=True)
class RunDetail:
    """What ``runs show`` shows: the summary, the run's record, its figures and checkpoints."""

    summary: RunState
    record: dict[str, Any]  # run.json ({} before the run wrote it)
    metrics: list[dict[str, Any]]
    checkpoints: list[CheckpointState]
    skipped_by_code: dict[str, int] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of ``key`` over the logged steps that have it as a number."""
        return [
            (int(m["step"]), float(m[key]))
            for m in self.metrics
            if isinstance(m.get(key), int | float) and not isinstance(m.get(key), bool)
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary.as_json(),
            "profile": self.record.get("profile"),
            "final_metrics": self.record.get("final_metrics"),
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "skipped_by_code": self.skipped_by_code,
            "metrics": self.metrics,
        }


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl`` that are whole JSON objects with a step (a line being written,
    or torn by a kill, is passed over); each step once, the last line of a step kept."""
    path = folder / METRICS_FILE
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})", fix="check its permissions") from None
    by_step: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        if (value := _metrics_line(line)) is not None:
            by_step[value["step"]] = value
    return [by_step[s] for s in sorted(by_step)]


def last_metrics(folder: Path) -> dict[str, Any]:
    """The last whole line of ``metrics.jsonl`` ({} without one), read from the file's end: a long
    run's file is not read whole to list it."""
    try:
        with (folder / METRICS_FILE).open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return {}
    # The first line of the tail may be cut; the last may be being written: both fail to parse.
    for line in reversed(tail.splitlines()):
        if (value := _metrics_line(line)) is not None:
            return value
    whole = read_metrics(folder) if size > TAIL_BYTES else []  # lines longer than the tail
    return whole[-1] if whole else {}


def _metrics_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(value, dict) and isinstance(value.get("step"), int) and not isinstance(value["step"], bool)
    return value if ok else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # absent, being replaced, or not ours: the run is read from its other files
    return value if isinstance(value, dict) else {}


def find_runs(root: Path) -> list[Path]:
    """Every run folder at or under ``root`` (``SEARCH_DEPTH`` levels down), in name order: a folder
    holding ``run.json``, ``metrics.jsonl`` or a run's lock. Checkpoint folders are not runs."""
    if not root.is_dir():
        raise DataError(f"{root} is not a folder", fix="give the folder that holds your runs (default ./checkpoints)")
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if any((folder / name).is_file() for name in (*RUN_FILES, LOCK_FILE)):
            found.append(folder)
            return
        if depth == SEARCH_DEPTH:
            return
        try:
            # Not through links: a `latest` link to a run would list it twice, and links can loop.
            children = sorted(
                p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")
            )
        except OSError:
            return  # a folder we may not read holds no run we can show
        for child in children:
            if checkpoint_step(child) is None:
                walk(child, depth + 1)

    walk(root, 0)
    return found


def checkpoint_states(folder: Path, *, verify: bool = False) -> list[CheckpointState]:
    """The run's checkpoints, oldest first: complete or not and, with ``verify``, intact or not
    (verifying reads every file: seconds for a large checkpoint)."""
    states = []
    for path in list_checkpoints(folder):
        manifest = _read_json(path / MANIFEST_FILE)
        files = manifest.get("files")
        complete = isinstance(files, dict) and STATE_FILE in files
        problem = damage(path) if verify else None
        verified = (problem is None) if verify else None
        states.append(CheckpointState(str(path), checkpoint_step(path), complete, verified, problem))
    return states


def read_run(folder: Path) -> RunState:
    """The state and latest figures of the run in ``folder``."""
    return _summary(folder, _read_json(folder / RUN_FILE), last_metrics(folder), checkpoint_states(folder))


def read_run_detail(folder: Path, *, verify: bool = False) -> RunDetail:
    """Everything ``runs show`` draws, checkpoints verified when asked."""
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"run folder {folder} {what}", fix="give a folder that `llavactl runs list` lists")
    if not any((folder / name).is_file() for name in (*RUN_FILES, LOCK_FILE)):
        raise DataError(
            f"{folder} holds no run (no {RUN_FILE}, {METRICS_FILE} or {LOCK_FILE})",
            fix="give a run's training.output_dir; `llavactl runs list` lists the runs under a folder",
        )
    record = _read_json(folder / RUN_FILE)
    metrics = read_metrics(folder)
    checkpoints = checkpoint_states(folder, verify=verify)
    summary = _summary(folder, record, metrics[-1] if metrics else {}, checkpoints)
    final = record.get("final_metrics") if isinstance(record.get("final_metrics"), dict) else {}
    skipped = final.get("skipped_by_code") if isinstance(final.get("skipped_by_code"), dict) else {}
    counts = {str(k): v for k, v in skipped.items() if isinstance(v, int) and not isinstance(v, bool)}
    return RunDetail(summary, record, metrics, checkpoints, counts)


def _summary(
    folder: Path, record: Mapping[str, Any], last: Mapping[str, Any], checkpoints: list[CheckpointState]
) -> RunState:
    holder = _read_json(folder / LOCK_FILE)
    pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
    host = holder.get("host") if isinstance(holder.get("host"), str) else None
    state, detail = _state(record, pid, host)
    final = record.get("final_metrics") if isinstance(record.get("final_metrics"), dict) else {}
    step = final.get("step") if isinstance(final.get("step"), int) else last.get("step")
    if isinstance(last.get("step"), int) and (step is None or last["step"] > step):
        step = last["step"]
    loss = final.get("final_loss", last.get("loss")) if state == "finished" else last.get("loss")
    profile = record.get("profile") if isinstance(record.get("profile"), dict) else {}
    complete = [c for c in checkpoints if c.complete]
    return RunState(
        folder=str(folder),
        state=state,
        detail=detail,
        pid=pid if state == "running" else None,
        host=host if state == "running" else None,
        profile=_profile_name(record.get("profile_source")),
        stage=profile.get("stage"),
        step=step,
        total_steps=record.get("total_steps") if isinstance(record.get("total_steps"), int) else None,
        last_loss=loss if isinstance(loss, int | float) else None,
        samples_per_s=last.get("samples_per_s") if isinstance(last.get("samples_per_s"), int | float) else None,
        last_checkpoint=complete[-1].path if complete else None,
        updated_at=max(_mtimes(folder), default=0.0),
        global_batch=_global_batch(record),
    )


def _state(record: Mapping[str, Any], pid: int | None, host: str | None) -> tuple[State, str | None]:
    status = record.get("status")
    alive = pid is not None and (host != socket.gethostname() or process_alive(pid))
    if alive:
        where = f"process {pid} on {host}" + ("" if host == socket.gethostname() else " (not checked from here)")
        return "running", where
    if status == "completed":
        return "finished", None
    if status == "failed":
        final = record.get("final_metrics") if isinstance(record.get("final_metrics"), dict) else {}
        error = str(final.get("error") or "no error recorded").strip().splitlines()
        return "failed", error[0] if error else "no error recorded"
    if status == "interrupted":
        return "interrupted", "stopped by a signal; `llavactl train --resume auto` continues it"
    if status == "running":
        return "interrupted", "its process is gone without a word (killed?); `--resume auto` continues it"
    return "starting", None if pid is None else f"process {pid} is gone before the run wrote its record"


def _profile_name(source: Any) -> str | None:
    return Path(source).stem if isinstance(source, str) and source else None


def _global_batch(record: Mapping[str, Any]) -> int | None:
    training = record.get("profile", {}).get("training") if isinstance(record.get("profile"), dict) else None
    world = record.get("world") if isinstance(record.get("world"), dict) else {}
    try:
        batch = int(training["per_device_train_batch_size"]) * int(training["gradient_accumulation_steps"])
        return batch * int(world.get("size") or 1)
    except (TypeError, KeyError, ValueError):
        return None


def _mtimes(folder: Path) -> Iterator[float]:
    for name in (RUN_FILE, METRICS_FILE):
        try:
            yield os.stat(folder / name).st_mtime
        except OSError:
            continue
    for path in list_checkpoints(folder)[-1:]:
        try:
            yield path.stat().st_mtime
        except OSError:
            continue


def profile_differences(runs: list[RunDetail]) -> dict[str, list[Any]]:
    """The profile keys whose values differ between ``runs`` (dotted), each with every run's value."""
    flat = [flatten(r.record["profile"]) if isinstance(r.record.get("profile"), dict) else {} for r in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}


def smoothed(values: list[float], weight: float = 0.6) -> list[float]:
    """An exponential moving average with TensorBoard's start-up correction (the first value is not
    pulled toward 0): what its "smoothing" slider draws."""
    out, mean = [], 0.0
    for k, value in enumerate(values, start=1):
        mean = weight * mean + (1 - weight) * value
        out.append(mean / (1 - weight**k))
    return out
