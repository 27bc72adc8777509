"""What a state file may make us do: checks before `list`, `status`, `stop`, `attach` or a start
believe BASE/INSTANCE/state.json, and before anything signals the process groups it names.

A state file is only as trustworthy as the directories holding it. When root runs `list` on a base
another user owns (`--runtime-dir /tmp/agentvm-UID`, or an XDG_RUNTIME_DIR kept after `su`), that
user can write a state.json naming any process group, and the stale-instance cleanup SIGKILLed it.
So: the base and each instance dir must be real directories (not symlinks) owned by the caller and
writable by nobody else, and a process group is signalled only when its leader is the very process
recorded (start ticks), runs as the caller, and started no earlier than the supervisor that
recorded it (a process that supervisor could have started).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from supervisor.children import read_start_ticks
from supervisor.errors import SupervisorError


def dir_problem(path: Path, what: str) -> str | None:
    """Why the directory `path` must not be trusted by this user, or None."""
    try:
        info = path.lstat()
    except OSError as exc:
        return f"the {what} {path} cannot be examined ({exc.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return f"the {what} {path} is not a directory (a symlink or a file is in its place)"
    if info.st_uid != os.geteuid():
        return f"the {what} {path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()})"
    if info.st_mode & 0o022:
        return f"the {what} {path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def check_base(base: Path) -> bool:
    """False when `base` does not exist (nothing runs there); raise when it exists and is not ours."""
    if not os.path.lexists(base):
        return False
    problem = dir_problem(base, "runtime dir")
    if problem is not None:
        raise SupervisorError(
            f"{problem}: the state files in it could name any process, so they are not read. Run the "
            "command as the user who owns it, or pass your own runtime dir with --runtime-dir"
        )
    return True


def instance_trusted(path: Path) -> bool:
    """An instance dir whose state file may be believed: ours, a real dir, writable by us alone."""
    return dir_problem(path, "instance dir") is None


def process_uid(pid: int) -> int | None:
    """The real uid of `pid` (from /proc/PID/status: it stays readable when the process is not
    dumpable, where /proc/PID itself turns root-owned)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def may_signal_group(pgid: int, start_ticks: int, supervisor_start_ticks: int) -> bool:
    """True when process group `pgid` is one the recorded supervisor started, run by this user."""
    if pgid <= 1 or start_ticks < supervisor_start_ticks:
        return False
    try:
        if read_start_ticks(pgid) != start_ticks or os.getpgid(pgid) != pgid:
            return False
    except (OSError, ValueError):
        return False
    return process_uid(pgid) == os.geteuid()
