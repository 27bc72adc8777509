"""A full disk, said as such: "the disk holding X is full (N bytes free)".

ENOSPC and EDQUOT surface while writing the state file, the env file, the console log, ... A
message that says "cannot write X (No space left on device)" next to a remedy about permissions
sends the user the wrong way; and a cause lost on the way (a write that failed in QEMU) used to end
as "QEMU exited before the guest reported a status". So every writer asks `full_disk_message` first.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from supervisor.errors import ExitCode, SupervisorError

FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int | None:
    """Bytes this user may still write on the filesystem holding `path` (its nearest existing dir)."""
    for candidate in (path, *path.parents):
        try:
            info = os.statvfs(candidate)
        except OSError:
            continue
        return info.f_bavail * info.f_frsize
    return None


def full_disk_message(path: Path, exc: OSError) -> str | None:
    """The paragraph for a write to `path` that failed with `exc`, when the disk is full; else None."""
    if exc.errno not in FULL:
        return None
    free = free_bytes(path)
    left = f"{free} bytes free" if free is not None else "free space unknown"
    quota = ", this user's disk quota is used up" if exc.errno == errno.EDQUOT else ""
    return (
        f"the disk holding {path} is full ({left}{quota}): cannot write {path.name}. Free some space "
        "there, or put the runtime dir (--runtime-dir), the agent home (--agent-home) or the console "
        "log (console.log-dir) on another filesystem"
    )


def raise_if_full(path: Path, exc: OSError) -> None:
    message = full_disk_message(path, exc)
    if message is not None:
        raise SupervisorError(message, exit_code=ExitCode.CANT_CREATE) from None
