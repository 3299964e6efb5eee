"""A run folder belongs to one run: a lock against a second live run, no silent mixing of runs, and
the checks a resume passes before anything loads (:func:`claim_run_folder`, :func:`resume_point`).

``llavactl train`` into a folder that already holds another run's checkpoints is refused unless it
resumes that run (``--resume``) or starts over (``--start-over``), which moves the old run's files
aside into a sibling folder and never deletes them. While a run trains, ``.llavactl.lock`` in its
folder names the process; a second run on the same folder is refused. A lock left by a process
that is gone (a crash, a kill -9) is stale and taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavactl.errors import ConfigError
from llavactl.system import process_alive
from llavactl.train import checkpoint

if TYPE_CHECKING:
    from llavactl.data.fingerprint import Fingerprint

LOCK_FILE = ".llavactl.lock"
# What a run writes into its folder; a folder holding any of these holds a run.
RUN_FILES = ("metrics.jsonl", "run.json")


def claim_run_folder(
    output_dir: Path, *, resume: str | None, start_over: bool, say: Callable[[str], None]
) -> RunFolderLock:
    """Before anything loads: ``output_dir`` can be written, no other live run uses it (the lock
    returned, held), and it holds no other run unless this one resumes it or starts over."""
    checkpoint.refuse_inside_checkpoint(output_dir, "training.output_dir")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"training.output_dir `{output_dir}` cannot be written: {exc.strerror or exc} ({exc.filename}).",
            fix="give `--output-dir` a folder you can write to, on a disk with room for checkpoints",
        ) from None
    lock = RunFolderLock(output_dir)
    lock.acquire()
    try:
        if resume is None:
            moved = refuse_or_move_aside(output_dir, start_over=start_over)
            if moved is not None:
                say(f"Moved the previous run in {output_dir} aside to {moved} (--start-over)")
        else:
            refuse_foreign_resume(output_dir, checkpoint.resolve_resume(resume, output_dir))
    except BaseException:
        lock.release()
        raise
    return lock


def resume_point(
    resume: str,
    output_dir: Path,
    *,
    profile: Mapping[str, Any],
    data_fingerprint: Fingerprint,
    world_size: int,
    force: bool,
    set_aside: bool,
    say: Callable[[str], None],
) -> Path | None:
    """The checkpoint ``resume`` names (None: the run has none yet), checked before anything loads:
    intact, a progress record a resume can read, saved by as many processes (or by a number whose
    steps this one can continue, which is said), and with the same profile and data as this run
    (``force``: changed ones are named and accepted). ``set_aside`` (rank 0): the run's later
    checkpoints are moved aside, since this run writes its own."""
    folder = checkpoint.resolve_resume(resume, output_dir)
    if folder is None:
        say(f"No checkpoint in {output_dir} yet: starting from step 0.")
        return None
    checkpoint.verify_checkpoint(folder)
    saved = checkpoint.read_progress(folder)
    checkpoint.require_resume_fields(saved, folder)
    new_world = checkpoint.check_world_change(folder, saved, profile, world_size)
    differences = checkpoint.resume_differences(saved["profile"], profile, saved["data_fingerprint"], data_fingerprint)
    if new_world is not None:
        # Changing the accumulation is how a step keeps its size on the new number of processes.
        differences = [line for line in differences if not line.startswith(f"{checkpoint.ACCUMULATION_KEY}:")]
        say(new_world)
    checkpoint.check_resume_compatible(folder, differences, force=force)
    if differences:
        say(f"Resuming with changed settings (--force): {'; '.join(differences)}")
    if set_aside:
        later = set_aside_later_checkpoints(output_dir, folder)
        if later is not None:
            say(f"Moved the checkpoints after {folder.name} aside to {later}: this run writes its own")
    return folder


class RunFolderLock:
    """``output_dir/.llavactl.lock`` held by this process until :meth:`release`.

    The file names its holder (pid, host, start) for the messages; what holds it is a kernel lock
    (``flock``) on the open file, which the kernel lets go of when the process dies, however it
    dies. Two processes taking over a stale lock together therefore cannot both win (deciding
    from the file's content and then replacing it could: each removed the other's new file). On a
    file system without locks, the file alone decides, as before.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_FILE
        self._held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; a ConfigError naming the live holder otherwise."""
        import fcntl

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # a folder of that name, a file we may not write
                raise ConfigError(
                    f"training.output_dir `{self.path.parent}`: its lock file {self.path} cannot be opened "
                    f"({exc.strerror or exc}).",
                    fix=f"remove {self.path} if no llavactl run is using the folder (it is only a lock file)",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self._holder()) from None
            except OSError:  # a file system without locks
                os.close(fd)
                return self._acquire_by_creation(me)
            if not self._names(fd):
                os.close(fd)  # released (removed) between our open and lock: lock the new file
                continue
            holder = self._holder()
            # Another machine's process cannot be looked at from here; a live process of this one
            # may hold the folder without a kernel lock (an older llavactl).
            if holder is not None and not self._is_stale(holder):
                os.close(fd)
                raise self._busy(holder)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self._fd, self._held = fd, True
            return None
        raise self._busy(self._holder())

    def _names(self, fd: int) -> bool:
        """Whether the lock file's path still names the file open as ``fd``."""
        try:
            return os.fstat(fd).st_ino == self.path.stat().st_ino
        except FileNotFoundError:
            return False

    def _acquire_by_creation(self, me: dict[str, object]) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and self._is_stale(holder):
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy(holder) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self._held = True
            return
        raise self._busy(self._holder())

    def release(self) -> None:
        if not self._held:
            return
        if self._fd is None:
            self.path.unlink(missing_ok=True)
        else:
            if self._names(self._fd):  # never another process's file
                self.path.unlink(missing_ok=True)
            os.close(self._fd)  # lets go of the kernel lock
            self._fd = None
        self._held = False

    def _holder(self) -> dict[str, object] | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # torn by a crash between create and write, or empty: nobody is holding it
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _is_stale(holder: dict[str, object]) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False  # another machine's process cannot be looked at from here
        return not process_alive(pid)

    def _busy(self, holder: dict[str, object] | None) -> ConfigError:
        who = (
            f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            if holder
            else "another process"
        )
        return ConfigError(
            f"training.output_dir `{self.path.parent}` is in use by another llavactl run ({who}): two runs in "
            "one folder would mix their checkpoints and metrics.",
            fix="wait for that run to end, or give this one another `--output-dir`; if no such run exists "
            f"(it ran on another machine that is gone), delete `{self.path}`",
        )


def holds_a_run(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds another run's checkpoints or records. A run that stopped before
    its first step (the memory probe, a bad first record) left only ``run.json``: nothing of it is
    lost when the next run writes its own, as that run's fix said to do."""
    if checkpoint.list_checkpoints(output_dir) or (output_dir / "metrics.jsonl").exists():
        return True
    return (output_dir / "run.json").exists() and not _stopped_before_step_1(output_dir / "run.json")


def _stopped_before_step_1(record: Path) -> bool:
    try:
        written = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    final = written.get("final_metrics") if isinstance(written, dict) else None
    return isinstance(final, dict) and written.get("status") in ("failed", "interrupted") and final.get("step") == 0


def refuse_or_move_aside(output_dir: Path, *, start_over: bool) -> Path | None:
    """For a run that does not resume: refuse a folder holding another run, or (``start_over``)
    move that run's files into a new sibling folder. Returns where they went (None: nothing there)."""
    if not holds_a_run(output_dir):
        return None
    if not start_over:
        raise ConfigError(
            f"training.output_dir `{output_dir}` already holds a run (its checkpoints, metrics.jsonl or "
            "run.json); starting another there would mix the two, and `--resume auto` or export would later "
            "pick the old run's checkpoints.",
            fix="continue that run with `--resume auto`, train into another `--output-dir`, or add "
            "`--start-over` to move the old run aside (into a sibling folder; nothing is deleted)",
        )
    aside = _new_sibling(output_dir, "previous")
    for entry in output_dir.iterdir():
        if entry.name != LOCK_FILE:
            shutil.move(str(entry), aside / entry.name)
    return aside


def _new_sibling(output_dir: Path, label: str) -> Path:
    """A new folder beside ``output_dir``: ``<name>.<label>-<date>-<time>[-k]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, suffix = output_dir.with_name(f"{output_dir.name}.{label}-{stamp}"), 1
    while aside.exists():
        aside = output_dir.with_name(f"{output_dir.name}.{label}-{stamp}-{suffix}")
        suffix += 1
    aside.mkdir()
    return aside


def refuse_foreign_resume(output_dir: Path, source: Path | None) -> None:
    """For a run that resumes from the checkpoint ``source`` (None: none yet) into ``output_dir``:
    refuse a folder holding another run when ``source`` is not one of its checkpoints."""
    if source is None or source.resolve().parent == output_dir.resolve() or not holds_a_run(output_dir):
        return
    raise ConfigError(
        f"--resume {source}: that checkpoint is not one of training.output_dir `{output_dir}`'s, and the folder "
        "holds another run (its checkpoints, metrics.jsonl or run.json); resuming there would mix the two runs.",
        fix=f"resume into a new `--output-dir`, or continue the run of `{output_dir}` with `--resume auto`",
    )


def set_aside_later_checkpoints(output_dir: Path, source: Path) -> Path | None:
    """Move the checkpoints of ``output_dir`` after ``source``'s step into a sibling folder: they
    belong to the history a resume from ``source`` replaces (left there, `--resume auto` and export
    would later take them for the new run's). Returns where they went (None: there were none)."""
    if source.resolve().parent != output_dir.resolve():
        return None
    step = checkpoint.checkpoint_step(source) or 0
    later = [c for c in checkpoint.list_checkpoints(output_dir) if (checkpoint.checkpoint_step(c) or 0) > step]
    if not later:
        return None
    aside = _new_sibling(output_dir, f"after-step-{step}")
    for folder in later:
        shutil.move(str(folder), aside / folder.name)
    return aside
