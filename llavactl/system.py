"""What the operating system says of a write that failed and of a process: asked by every layer."""

from __future__ import annotations

import errno
import os


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
