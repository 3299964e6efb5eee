"""`llavactl train --nproc-per-node N`: N training processes on this machine, and their signals.

The launcher starts N copies of the same command with the environment torchrun gives its workers
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``)
and waits. The workers run in a process group of their own, so that a terminal's Ctrl-C reaches
them once, through the launcher, which forwards every SIGINT and SIGTERM it gets: the first makes
them save a checkpoint after the current step and exit 130/143, a second stops them without saving,
as for one process. A worker that fails makes the launcher stop the others (which would otherwise
wait for it in their next collective). Workers watch the launcher and stop, saving, within about a
second of its death (a kill -9 of the launcher). Several machines: use torchrun itself
(docs/distributed.md).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

# Set in a worker's environment: the launcher's pid, which the worker watches.
LAUNCHER_ENV = "LLAVACTL_LAUNCHER_PID"
# After one worker fails, the others get this long to stop before they are killed.
_GRACE_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, words: Sequence[str]) -> int:
    """Run ``python -m llavactl WORDS`` on ``nproc`` processes; the exit code the command should end with."""
    port = _free_port()
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        LAUNCHER_ENV: str(os.getpid()),
    }
    sys.stdout.flush()
    sys.stderr.flush()
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "llavactl", *words],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            start_new_session=True,  # terminal signals come through the launcher, once
        )
        for rank in range(nproc)
    ]
    forwarded: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        forwarded.append(signum)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(workers, forwarded)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(workers: list[subprocess.Popen[bytes]], forwarded: list[int]) -> int:
    failed_at: float | None = None
    while any(w.poll() is None for w in workers):
        if failed_at is None and not forwarded and any(w.returncode not in (None, 0) for w in workers):
            # A worker failed on its own: the others would wait for it in their next collective.
            failed_at = time.monotonic()
            for w in workers:
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > _GRACE_S:
            for w in workers:
                if w.poll() is None:
                    w.kill()
        time.sleep(0.1)
    if forwarded:
        return 128 + forwarded[0]
    codes = [w.returncode if w.returncode >= 0 else 128 - w.returncode for w in workers]
    failures = [c for c in codes if c != 0]
    # Processes that only lost a peer exit 1 (their error says so): the failing one's code is the cause.
    return next((c for c in failures if c != 1), failures[0] if failures else 0)


def watch_launcher() -> None:
    """In a worker: SIGTERM this process (which saves and stops) once the launcher is gone."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return
    pid = int(launcher)

    def watch() -> None:
        while os.getppid() == pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="llavactl-launcher-watch", daemon=True).start()
