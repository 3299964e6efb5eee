"""Training checkpoints on disk: atomic writes, retention, discovery, loading and resume checks.

A checkpoint is a folder ``checkpoint-<step>`` in the output folder holding

- the trainable weights, in safetensors (written by the model side's ``save_trainable``),
- ``optimizer.pt``: optimizer, scheduler and gradient-scaler state dicts,
- ``rng.pt``: the Python, torch CPU and CUDA random states (of rank 0 in a multi-process run;
  ``rng-rank<k>.pt`` holds rank k's),
- ``trainer_state.json``: the progress record (step, epoch, data position, bad-step counts, the
  resolved profile and a fingerprint of the data).

The ``.pt`` files hold only tensors and plain containers, so they load with
``torch.load(weights_only=True)``: resuming never unpickles arbitrary objects. A checkpoint is
written into a hidden temporary folder and renamed into place, and ``trainer_state.json`` is written
last, so a crash mid-save leaves the previous checkpoints as they were and never a half one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llavactl.errors import CheckFailed, ConfigError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
RANK_RNG_FILE = "rng-rank{rank}.pt"

# Keys that change how a run is watched or kept, not what it computes: they may differ on resume.
RUN_CONTROL_KEYS = frozenset(
    {
        "description",
        "training.output_dir",
        "training.logging_steps",
        "training.save_steps",
        "training.save_total_limit",
        "training.report_to",
        "training.dataloader_num_workers",
        "training.max_bad_steps",
    }
)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder, or None for anything else."""
    if not folder.name.startswith(PREFIX) or not (folder / STATE_FILE).is_file():
        return None
    suffix = folder.name[len(PREFIX) :]
    return int(suffix) if suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = [(step, p) for p in output_dir.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The folder ``--resume`` names: ``auto`` is the latest in ``output_dir`` (None if there is none)."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    folder = Path(resume).expanduser()
    if checkpoint_step(folder) is None:
        candidates = ", ".join(p.name for p in list_checkpoints(folder)) if folder.is_dir() else ""
        hint = f" It holds checkpoints: {candidates}." if candidates else ""
        raise ConfigError(
            f"--resume {resume}: not a complete llavactl checkpoint folder (a `{PREFIX}<step>` "
            f"folder with {STATE_FILE}).{hint}",
            fix=f"pass a checkpoint folder, e.g. `--resume {folder}/{PREFIX}<step>`, or `--resume auto`",
        )
    return folder


def capture_rng() -> dict[str, Any]:
    """The random states that training consumes (dropout, shuffling helpers)."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put back the random states from :func:`capture_rng`."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    write_weights: Callable[[Path], None],
    training_state: Mapping[str, Any],
    progress: Mapping[str, Any],
    save_total_limit: int | None,
    rank_rng: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then drop the oldest beyond ``save_total_limit``.

    ``write_weights(folder)`` writes the weights; ``training_state`` (optimizer, scheduler, scaler
    state dicts) goes to ``optimizer.pt``; ``progress`` (JSON) to ``trainer_state.json``.
    ``rank_rng``: the random states of every process, rank 0 first (default: this process's).
    """
    import torch

    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    tmp.mkdir()
    write_weights(tmp)
    torch.save(dict(training_state), tmp / OPTIMIZER_FILE)
    for rank, rng in enumerate(rank_rng or [capture_rng()]):
        torch.save(dict(rng), tmp / _rng_file(rank))
    _write_json_durably(tmp / STATE_FILE, dict(progress))

    final = output_dir / f"{PREFIX}{step}"
    if final.exists():
        # Saving the same step again (an interrupt right after a periodic save): replace it.
        old = output_dir / f"{TMP_PREFIX}{step}.old"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(output_dir)
    if save_total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(stale)
    return final


def _write_json_durably(path: Path, data: dict[str, Any]) -> None:
    with path.open("w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_progress(folder: Path) -> dict[str, Any]:
    """The progress record of a checkpoint."""
    return json.loads((folder / STATE_FILE).read_text())


def _rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else RANK_RNG_FILE.format(rank=rank)


def read_training_state(folder: Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """The optimizer/scheduler/scaler states and process ``rank``'s RNG states, loaded without
    unpickling code."""
    import torch

    training_state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    rng = torch.load(folder / _rng_file(rank), map_location="cpu", weights_only=True)
    return training_state, rng


def check_same_world(folder: Path, saved_world_size: int, world_size: int) -> None:
    """Refuse to resume with another number of processes: data shards and random states are per process."""
    if saved_world_size != world_size:
        raise CheckFailed(
            f"{folder} was saved by a run of {saved_world_size} training process(es), this run has {world_size}. "
            "Each process's share of the data and its random states are in the checkpoint, so an exact "
            "resume needs the same number of processes.",
            fix=f"start {saved_world_size} process(es) (`llavactl train --nproc-per-node {saved_world_size} ...`, "
            "or torchrun with --nnodes x --nproc-per-node totalling that), or train from step 0 in a new "
            "`training.output_dir`",
        )


def fingerprint_data(data_path: str) -> str:
    """A content hash of the data file, so that a resume notices edited records."""
    path = Path(data_path).expanduser()
    if not path.is_file():
        return data_path  # builtin data sets are generated from their name and the seed
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def resume_differences(
    saved_profile: Mapping[str, Any],
    current_profile: Mapping[str, Any],
    saved_data: str,
    current_data: str,
) -> list[str]:
    """One line per setting or data change since the checkpoint that alters what training computes."""
    before, after = flatten(saved_profile), flatten(current_profile)
    lines = [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if key not in RUN_CONTROL_KEYS and before.get(key) != after.get(key)
    ]
    if saved_data != current_data:
        lines.append(f"data content: {saved_data} -> {current_data}")
    return lines


def check_resume_compatible(folder: Path, differences: list[str], *, force: bool) -> None:
    """Refuse a resume whose profile or data changed since ``folder`` was saved, unless forced."""
    if differences and not force:
        shown = "\n".join(f"  {line}" for line in differences)
        raise CheckFailed(
            f"The profile or data changed since {folder} was saved, so the run would not continue "
            f"the same training:\n{shown}",
            fix="undo those changes, or add `--force` to resume with the new values",
        )
