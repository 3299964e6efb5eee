"""What the operating system says of a write that failed, of a process and of a file's bytes: asked by every layer."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path


def file_sha256(path: Path) -> str:
    """The SHA-256 of every byte of ``path`` (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def is_full_disk(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for want of space (a full disk, a quota, a file-size
    limit): what freeing space fixes, unlike a read-only folder or a folder where a file should be."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a process of another user holds that pid
    except OverflowError:
        return False  # no pid is that large
    return True
