"""llavactl's cache of what is worked out from data: where it lives and how a file is kept there.

``$LLAVACTL_CACHE`` (else ``~/.cache/llavactl``) holds the record indexes of JSON files, token counts,
`data check` reports and the builtin data sets. A kept file is named ``<path hash>-<version hash>``:
the data file's path, then the version of it (its fingerprint and the format's version), so that a
changed file never meets a stale entry and the entries of its older versions can be dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Data smaller than this is scanned in a blink: nothing worked out of it is written to the cache.
CACHE_MIN_BYTES = 4 << 20


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What tells one version of a file from another without reading it: size, modification and
    change times, inode and device. The change time too: a tool that writes in place and restores the
    mtime (``rsync --inplace -t``) cannot set it."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def cache_root() -> Path:
    return Path(os.environ.get("LLAVACTL_CACHE") or Path.home() / ".cache" / "llavactl")


def keyed_name(path: Path, version: object) -> str:
    """``<path hash>-<version hash>``: how what is kept of ``path`` at ``version`` is named."""
    named = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return f"{named}-{hashlib.sha256(repr(version).encode()).hexdigest()[:16]}"


def keep(target: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``target`` in the cache (``.npy`` for one called ``index``, else ``.npz``)
    atomically, by a rename: processes that race each write a whole file. Then drop the files kept
    for older versions of the same data file. A cache that cannot be written costs the next command
    the work again, nothing else."""
    import numpy as np

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix, dir=target.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            if target.suffix == ".npy":
                np.save(f, arrays["index"])
            else:
                np.savez(f, **arrays)
        os.replace(tmp, target)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return
    drop_older(target)


def drop_older(target: Path) -> None:
    """Remove the files beside ``target`` kept for older versions of its data file (same path hash)."""
    named, version = target.name.split("-")[:2]
    for old in target.parent.glob(f"{named}-*"):
        if old.name.split("-")[1] != version:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def scan_lock(cached: Path) -> Iterator[None]:
    """Hold an exclusive lock on working out ``cached`` (a lock file in the cache's ``locks`` folder,
    never removed; the OS lets go of it when its process dies). Without a writable cache every
    process does the work for itself."""
    import fcntl

    try:
        locks = cached.parent.parent / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        # One per data file (named by its path's hash): a changed file is scanned under the same lock.
        fd = os.open(locks / f"{cached.name.split('-')[0]}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        # A file system without locks: every process scans for itself, as without a cache.
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
