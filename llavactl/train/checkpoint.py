"""Training checkpoints on disk: atomic writes, retention, discovery, loading and resume checks.

A checkpoint is a folder ``checkpoint-<step>`` in the output folder holding

- the trainable weights, in safetensors (written by the model side's ``save_trainable``),
- ``optimizer.pt``: optimizer, scheduler and gradient-scaler state dicts,
- ``rng.pt``: the Python, torch CPU and CUDA random states (of rank 0 in a multi-process run;
  ``rng-rank<k>.pt`` holds rank k's),
- ``trainer_state.json``: the progress record (step, epoch, data position, bad-step counts, the
  resolved profile and a fingerprint of the data),
- ``manifest.json``, written last: every other file with its size and SHA-256. Loading a
  checkpoint (resume, export, predict, eval) checks it and names a damaged file and the newest
  intact checkpoint instead.

The ``.pt`` files hold only tensors and plain containers, so they load with
``torch.load(weights_only=True)``: resuming never unpickles arbitrary objects. A checkpoint is
written into a hidden temporary folder and renamed into place, so a crash mid-save leaves the
previous checkpoints as they were and never a half one; one that is deleted (retention) is first
renamed into a hidden folder, so a kill mid-delete never leaves a partial checkpoint that looks whole.
Retention never removes the newest checkpoint saved after a good step.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.errors import CheckFailed, CheckpointError, ConfigError, OutputError
from llavactl.system import file_sha256, is_full_disk

if TYPE_CHECKING:
    from llavactl.data.fingerprint import Fingerprint

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
RANK_RNG_FILE = "rng-rank{rank}.pt"
MANIFEST_FILE = "manifest.json"
# Room kept free beyond a checkpoint's size when checking the disk before a save.
_DISK_MARGIN = 1.1

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
        "training.memory_probe",  # runs before step 1, and puts every state back
        "training.max_bad_steps",
    }
)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder, or None for anything else."""
    if not folder.name.startswith(PREFIX) or not (folder / STATE_FILE).is_file():
        return None
    suffix = folder.name[len(PREFIX) :]
    return int(suffix) if suffix.isdigit() else None


def refuse_inside_checkpoint(folder: Path, what: str) -> None:
    """:class:`ConfigError` when ``folder`` is a checkpoint folder or lies inside one: what is written
    there would sit among the checkpoint's files (and be deleted with it by retention)."""
    absolute = folder.expanduser().absolute()
    inside = next((p for p in (absolute, *absolute.parents) if checkpoint_step(p) is not None), None)
    if inside is not None:
        raise ConfigError(
            f"{what} `{folder}` is inside the checkpoint folder {inside}: its files would be mixed with the "
            "checkpoint's, and deleted with it when the run keeps only its newest checkpoints.",
            fix=f"use a folder outside {inside}",
        )


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


def stage_checkpoint(output_dir: Path, step: int, *, expected_bytes: int = 0) -> Path | None:
    """The hidden folder a save of ``checkpoint-<step>`` writes into before it is renamed into place,
    made empty (None: that checkpoint is complete already, and is kept). Where several processes
    write a checkpoint (torch.distributed.checkpoint's shards), rank 0 stages it and all write into it.
    ``expected_bytes``: the size the checkpoint will have, for the free-space check of a first save
    (later ones use the last checkpoint's size). Raises :class:`OutputError` as :func:`save_checkpoint`."""
    final = output_dir / f"{PREFIX}{step}"
    if checkpoint_step(final) is not None:
        # Saved already at this step (a resume of a finished run, which then saves at its end):
        # the state is the same, and the folder is kept rather than replaced.
        return None
    if final.exists() or final.is_symlink():
        raise OutputError(
            f"Saving {final} failed: something of that name is there and is not a complete checkpoint (no "
            f"{STATE_FILE} file); a save does not replace it. The checkpoints saved before are intact.",
            fix=f"move {final} away (it may be a damaged checkpoint), then continue with `--resume auto`",
        )
    with save_failures(final, output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        _check_free_space(output_dir, expected_bytes)
        tmp = output_dir / f"{TMP_PREFIX}{step}"
        tmp.mkdir()
    return tmp


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    write_weights: Callable[[Path], None],
    training_state: Mapping[str, Any],
    progress: Mapping[str, Any],
    save_total_limit: int | None,
    rank_rng: Sequence[Mapping[str, Any]] | None = None,
    expected_bytes: int = 0,
    staged: Path | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then drop the oldest beyond ``save_total_limit``.

    ``write_weights(folder)`` writes the weights; ``training_state`` (optimizer, scheduler, scaler
    state dicts) goes to ``optimizer.pt``; ``progress`` (JSON) to ``trainer_state.json``.
    ``rank_rng``: the random states of every process, rank 0 first (default: this process's).
    ``staged``: the folder of :func:`stage_checkpoint` that other writers have written into already
    (else it is staged here, with ``expected_bytes``). The manifest covers every file of the folder.
    A save that fails (a full disk, a read-only folder) removes what it wrote and raises
    :class:`OutputError`; the checkpoints saved before are untouched.
    """
    import torch

    final = output_dir / f"{PREFIX}{step}"
    tmp = staged or stage_checkpoint(output_dir, step, expected_bytes=expected_bytes)
    if tmp is None:
        return final
    with save_failures(final, output_dir):
        try:
            write_weights(tmp)
            torch.save(dict(training_state), tmp / OPTIMIZER_FILE)
            for rank, rng in enumerate(rank_rng or [capture_rng()]):
                torch.save(dict(rng), tmp / _rng_file(rank))
            _write_json_durably(tmp / STATE_FILE, dict(progress))
            _write_json_durably(tmp / MANIFEST_FILE, _manifest(tmp))
            tmp.rename(final)
            _fsync_dir(output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if save_total_limit is not None:
        _apply_retention(output_dir, save_total_limit)
    return final


@contextmanager
def save_failures(final: Path, output_dir: Path) -> Iterator[None]:
    """Within: a file of checkpoint ``final`` that cannot be written becomes one :class:`OutputError`."""
    try:
        yield
    except Exception as exc:
        if not _write_failure(exc):
            raise
        said = _write_failure_said(exc, output_dir)
        raise OutputError(
            f"Saving {final} failed: {said}. Its partial files were removed; the checkpoints saved before it are "
            "intact.",
            fix=(
                "free space on that disk"
                if is_full_disk(exc) or not isinstance(exc, OSError)
                else "make the folder writable"
            )
            + ", then continue with `--resume auto`",
        ) from None


def _apply_retention(output_dir: Path, limit: int) -> None:
    """Remove the oldest checkpoints beyond ``limit``, but never the newest one saved after a good
    step (interrupt saves in a streak of non-finite losses must not push it out). Each goes by a
    rename into a hidden folder first: a kill mid-delete leaves nothing that looks like a checkpoint."""
    checkpoints = list_checkpoints(output_dir)
    keep = set(checkpoints[-limit:])
    good = latest_good_checkpoint(output_dir)
    if good is not None:
        keep.add(good)
    for old in checkpoints:
        if old not in keep:
            doomed = output_dir / f"{TMP_PREFIX}{old.name}.deleting"
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _check_free_space(output_dir: Path, expected_bytes: int) -> None:
    """Refuse to start a save that cannot fit: the newest checkpoint's size (or, for the first, the
    expected one), with a margin."""
    latest = latest_checkpoint(output_dir)
    size = sum(f.stat().st_size for f in latest.iterdir() if f.is_file()) if latest else expected_bytes
    needed = max(size, expected_bytes) * _DISK_MARGIN
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        from llavactl.train.progress import format_bytes

        like = f"the size of {latest.name}" if latest else "its weights and optimizer states"
        raise OutputError(
            f"Not enough space to save a checkpoint in {output_dir}: about {format_bytes(int(needed))} needed "
            f"({like}), {format_bytes(free)} free. The checkpoints saved before are intact.",
            fix="free space on that disk, or lower `training.save_total_limit`; then continue with `--resume auto`",
        )


def _manifest(folder: Path) -> dict[str, Any]:
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name != MANIFEST_FILE)
    return {"format": 1, "files": {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in files}}


def damage(folder: Path) -> str | None:
    """What is wrong with checkpoint ``folder`` (a missing, truncated or altered file, an unreadable
    manifest or progress record), or None when every file is as its manifest says."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or STATE_FILE not in files:
            return f"{MANIFEST_FILE} does not list the checkpoint's files"
    except FileNotFoundError:
        return f"{MANIFEST_FILE} is missing (the checkpoint is incomplete, or from an older llavactl)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_FILE} is unreadable ({type(exc).__name__})"
    for name, expected in files.items():
        # Only names of files in the folder, each with an integer size: what llavactl writes.
        if (
            not isinstance(name, str)
            or Path(name).name != name
            or not isinstance(expected, dict)
            or type(expected.get("size")) is not int
        ):
            return f"{MANIFEST_FILE} lists {str(name)[:60]!r} as no manifest llavactl writes does (edited?)"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing" if not path.exists() else f"{name} is not a file"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} is {size:,} bytes, not the {expected['size']:,} it was saved with"
        if file_sha256(path) != expected.get("sha256"):
            return f"{name} does not hold the bytes it was saved with (its checksum differs)"
    return None


def newest_intact_checkpoint(output_dir: Path, *, below: int | None = None) -> Path | None:
    """The newest checkpoint in ``output_dir`` (of a step below ``below``) whose files are intact."""
    for folder in reversed(list_checkpoints(output_dir)):
        step = checkpoint_step(folder)
        if (below is None or (step is not None and step < below)) and damage(folder) is None:
            return folder
    return None


def verify_checkpoint(folder: Path) -> None:
    """Raise :class:`CheckpointError` naming the damaged file of ``folder`` and the newest intact
    checkpoint beside it."""
    problem = damage(folder)
    if problem is None:
        return
    step = checkpoint_step(folder)
    intact = newest_intact_checkpoint(folder.parent, below=step)
    instead = (
        f"The newest intact checkpoint is {intact}: resume with `--resume {intact}`, or load that one."
        if intact
        else "No older checkpoint in that folder is intact."
    )
    raise CheckpointError(
        f"Checkpoint {folder} is damaged: {problem}. {instead}",
        fix=f"use {intact}" if intact else "train from step 0 (`--start-over`), or restore the folder from a copy",
    )


def latest_good_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint saved after a step with a finite loss (none in a row of bad ones)."""
    for folder in reversed(list_checkpoints(output_dir)):
        try:
            if read_progress(folder).get("bad_steps_in_a_row", 0) == 0:
                return folder
        except CheckpointError:
            continue
    return None


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


def read_progress(folder: Path, total_steps: int | None = None) -> dict[str, Any]:
    """The progress record of a checkpoint, its shape checked (and its step within ``total_steps``)."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{folder / STATE_FILE} cannot be read ({type(exc).__name__}: {str(exc)[:120]}).",
            fix="load another checkpoint of the run (or its latest intact one with `--resume auto`)",
        ) from None
    step = saved.get("step") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("profile"), dict):
        problem = "is not a llavactl progress record (no `profile` mapping)"
    elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problem = f"has a step that is not a whole number of steps ({str(step)[:40]!r})"
    elif total_steps is not None and step > total_steps:
        problem = f"is at step {step}, beyond this run's {total_steps} steps"
    else:
        return saved
    raise CheckpointError(
        f"{folder / STATE_FILE} {problem}.",
        fix="load another checkpoint of the run, or raise `training.max_steps` when the run is meant to go on",
    )


# What a resume reads of trainer_state.json beyond the step and profile (read_progress checks those).
# The data's fingerprint is a dict (:mod:`llavactl.data.fingerprint`); an older llavactl wrote a string.
RESUME_FIELDS = {
    "data_fingerprint": (dict, str),
    "data_position": dict,
    "bad_steps_total": int,
    "bad_steps_in_a_row": int,
}


def require_resume_fields(saved: Mapping[str, Any], folder: Path) -> None:
    """Raise :class:`CheckpointError` when the progress record lacks what a resume reads."""
    for key, kind in RESUME_FIELDS.items():
        value = saved.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(
                f"{folder / STATE_FILE} has no `{key}` that a resume can read ({str(value)[:40]!r}): it was edited "
                "or written by another tool.",
                fix="resume from another checkpoint of the run (`--resume PATH`)",
            )


def _write_failure(exc: Exception) -> bool:
    """Whether ``exc`` is a file that could not be written (a full disk, a file-size limit) as the
    writers report it: an OSError, safetensors' SafetensorError, torch.save's RuntimeError."""
    if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
        return True
    said = str(exc)
    return isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in said or "inline_container" in said)


def _write_failure_said(exc: Exception, output_dir: Path) -> str:
    """What failed, for the user: the OS's words and the file, or the writer's."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename or output_dir})"
    if isinstance(exc, RuntimeError):  # torch.save's stream writer (also under torch.distributed.checkpoint)
        return f"a file was cut short, as on a full disk or past a file-size limit (torch: {str(exc)[:120]})"
    return str(exc)[:160]


def _rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else RANK_RNG_FILE.format(rank=rank)


def read_training_state(folder: Path, rank: int = 0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The optimizer/scheduler/scaler states and process ``rank``'s RNG states, loaded without
    unpickling code. No RNG states (None) for a rank the checkpoint's run did not have (a resume on
    more processes): the manifest, checked before, names every file the checkpoint was saved with."""
    import torch

    names = [OPTIMIZER_FILE, _rng_file(rank)]
    if rank > 0 and not (folder / names[1]).is_file():
        names.pop()
    states: list[Any] = []
    for name in names:
        try:
            states.append(torch.load(folder / name, map_location="cpu", weights_only=True))
        # torch reports a torn file as RuntimeError, bytes that are no pickle as UnpicklingError.
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise CheckpointError(
                f"{folder / name} cannot be loaded ({type(exc).__name__}: {str(exc)[:120]}).",
                fix="resume from another checkpoint of the run (`--resume PATH`)",
            ) from None
    return states[0], states[1] if len(states) > 1 else None


@contextmanager
def foreign_content(folder: Path) -> Iterator[None]:
    """Within: loading ``folder``'s states into the run; a state that is not what llavactl saved
    (files whose checksums match, written by hand or by another tool: a damaged file fails its
    checksum before this) becomes a :class:`CheckpointError` naming the checkpoint."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"Checkpoint {folder} does not hold the states llavactl saves ({type(exc).__name__}: {str(exc)[:120]}).",
            fix="resume from another checkpoint of the run (`--resume PATH`)",
        ) from exc


ACCUMULATION_KEY = "training.gradient_accumulation_steps"


def check_world_change(
    folder: Path, saved: Mapping[str, Any], profile: Mapping[str, Any], world_size: int
) -> str | None:
    """None when ``folder`` was saved by as many processes as this run has; otherwise the line that
    says how the run continues on the new number, or :class:`CheckFailed` when it cannot.

    Another number of processes resumes when an optimizer step stays as many micro-batches of the
    same size (accumulation x processes), so that the steps, the schedule and the data order mean what
    they meant: the data then continues at the first micro-batch of the epoch that no process had
    used (:meth:`~llavactl.data.dataset.ResumableSampler.load_state_dict`)."""
    saved_world = saved.get("world_size", 1)
    if saved_world == world_size:
        return None
    before, now = saved["profile"]["training"], profile["training"]
    per_step = before["gradient_accumulation_steps"] * saved_world
    if "global_batches" not in saved["data_position"]:
        raise CheckFailed(
            f"{folder} was saved by a run of {saved_world} training process(es), this run has {world_size}, and "
            "its data position is that of each process (it was saved by an earlier llavactl): it resumes on "
            f"{saved_world} only.",
            fix=f"start {saved_world} process(es), or train from step 0 in a new `training.output_dir`",
        )
    if now["gradient_accumulation_steps"] * world_size == per_step and (
        now["per_device_train_batch_size"] == before["per_device_train_batch_size"]
    ):
        return (
            f"Resuming {folder.name} of a {saved_world}-process run on {world_size}: each step is still {per_step} "
            f"micro-batches ({now['gradient_accumulation_steps']} accumulation x {world_size} processes), and the "
            "data continues at the first micro-batch of the epoch that no process had used. Not bit-exact: the "
            "gradients are summed in another order, and the random streams (dropout) are not the ones the run "
            "would have drawn."
        )
    if per_step % world_size == 0:
        fix = (
            f"add `{ACCUMULATION_KEY}={per_step // world_size}` (and keep `training.per_device_train_batch_size="
            f"{before['per_device_train_batch_size']}`)"
        )
    else:
        counts = [n for n in range(1, per_step + 1) if per_step % n == 0]
        fix = f"use a number of processes that divides {per_step}: {', '.join(map(str, counts))}"
    raise CheckFailed(
        f"{folder} was saved by a run of {saved_world} training process(es) whose steps are {per_step} micro-batches "
        f"of {before['per_device_train_batch_size']} ({before['gradient_accumulation_steps']} accumulation x "
        f"{saved_world}); on {world_size} with accumulation {now['gradient_accumulation_steps']} and micro-batches "
        f"of {now['per_device_train_batch_size']} a step would be another batch, and the schedule and data "
        "position would not continue the run.",
        fix=fix,
    )


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
    saved_data: object,
    current_data: Fingerprint,
) -> list[str]:
    """One line per setting or data change since the checkpoint that alters what training computes
    (the data's: which file, shard or mixture source changed, and what of it)."""
    before, after = flatten(saved_profile), flatten(current_profile)
    lines = [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if key not in RUN_CONTROL_KEYS and before.get(key) != after.get(key)
    ]
    return lines + current_data.changes_since(saved_data)


def check_resume_compatible(folder: Path, differences: list[str], *, force: bool) -> None:
    """Refuse a resume whose profile or data changed since ``folder`` was saved, unless forced."""
    if differences and not force:
        shown = "\n".join(f"  {line}" for line in differences)
        raise CheckFailed(
            f"The profile or data changed since {folder} was saved, so the run would not continue "
            f"the same training:\n{shown}",
            fix="undo those changes, or add `--force` to resume with the new values",
        )
