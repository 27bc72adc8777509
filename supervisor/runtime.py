"""The per-instance runtime dir: sockets, the state file, the console log.

Layout: BASE/INSTANCE/ where BASE is `runtime-dir` from the config, else $XDG_RUNTIME_DIR/agentvm,
else /run/agentvm for root, else /tmp/agentvm-UID. BASE and every instance dir are 0700 and must be
owned by the invoking user. INSTANCE/state.json records the supervisor and its process groups so a
later start (or `list`) can recognise, and clean up after, a supervisor that died without cleaning.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Mapping
from pathlib import Path

import msgspec
import structlog

from supervisor import diskfull, trust, xdg
from supervisor.children import read_start_ticks
from supervisor.errors import ExitCode, SupervisorError

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL
STATE_FILE = "state.json"


class GroupRecord(msgspec.Struct, frozen=True):
    name: str
    pgid: int
    start_ticks: int


class InstanceState(msgspec.Struct, frozen=True):
    instance: str
    supervisor_pid: int
    supervisor_start_ticks: int
    created: float
    work_dir: str | None = None
    groups: tuple[GroupRecord, ...] = ()
    # The inode of the supervisor's PID namespace (0: unknown). Its pids mean nothing in another
    # namespace: a runtime dir shared with a container must not make us kill by foreign pids.
    pid_ns: int = 0


def default_base(env: Mapping[str, str], uid: int) -> Path:
    runtime_dir = xdg.runtime_dir(env)
    if runtime_dir is not None:
        return runtime_dir / "agentvm"
    if uid == 0:
        return Path("/run/agentvm")
    return Path(f"/tmp/agentvm-{uid}")


def new_instance_id(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def socket_path_problem(path: Path, what: str) -> tuple[str, str] | None:
    """(what is wrong, the remedy) when `path` is too long to bind, else None."""
    length = len(os.fsencode(path))
    if length <= SUN_PATH_MAX:
        return None
    return (
        f"the socket path for {what}, {path}, is {length} bytes, over the {SUN_PATH_MAX}-byte limit of "
        "a unix socket address (sun_path)",
        "use a shorter runtime dir (runtime-dir in the config or --runtime-dir, e.g. /tmp/agentvm) or a "
        "shorter instance name or share tag",
    )


def base_problem(base: Path) -> tuple[str, str] | None:
    """(what is wrong, the remedy) for an existing runtime base we must not use, else None."""
    try:
        info = base.lstat()
    except OSError as exc:
        return f"the runtime dir {base} cannot be examined ({exc.strerror})", "choose one with --runtime-dir"
    if not stat.S_ISDIR(info.st_mode):
        return (
            f"the runtime dir {base} is not a directory (a symlink or a file is in the way)",
            "remove it, or choose another with --runtime-dir",
        )
    if info.st_uid != os.geteuid():
        return (
            f"the runtime dir {base} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); "
            "another user could replace its sockets",
            "choose a dir of your own with --runtime-dir",
        )
    if info.st_mode & 0o022:
        return (
            f"the runtime dir {base} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})",
            f"run 'chmod 700 {base}' or choose another with --runtime-dir",
        )
    return None


def ensure_base(base: Path) -> None:
    """Create BASE 0700 if missing; refuse one that another user owns or others can write."""
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SupervisorError(
            f"cannot create the runtime dir {base} ({exc.strerror}): make its parent writable for this "
            "user, or choose another with --runtime-dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    problem = base_problem(base)
    if problem is not None:
        raise SupervisorError(f"{problem[0]}: {problem[1]}", exit_code=ExitCode.CANT_CREATE)


def create_instance_dir(base: Path, instance: str) -> Path:
    path = base / instance
    try:
        path.mkdir(mode=0o700)
    except OSError as exc:
        diskfull.raise_if_full(path, exc)
        raise SupervisorError(
            f"cannot create the instance dir {path} ({exc.strerror}): check that {base} is writable "
            "for this user and the disk is not full, or choose another base with --runtime-dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    return path


def write_state(path: Path, state: InstanceState) -> None:
    """Replace INSTANCE/state.json atomically (readers never see half a file)."""
    temporary = path / f".{STATE_FILE}.tmp"
    try:
        temporary.write_bytes(msgspec.json.encode(state))
        temporary.replace(path / STATE_FILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        diskfull.raise_if_full(path / STATE_FILE, exc)
        raise SupervisorError(
            f"cannot write {path / STATE_FILE} ({exc.strerror}): the instance dir {path} was changed "
            "while the VM was starting (its permissions, or removed, or the disk is full); keep other "
            "programs out of the runtime dir, or choose another with --runtime-dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None


def read_state(path: Path) -> InstanceState | None:
    try:
        return msgspec.json.decode((path / STATE_FILE).read_bytes(), type=InstanceState)
    except (OSError, msgspec.DecodeError):
        return None


def process_alive(pid: int, start_ticks: int) -> bool:
    """True when `pid` is the very process recorded (not a recycled pid) and not a zombie."""
    try:
        if read_start_ticks(pid) != start_ticks:
            return False
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] != b"Z"
    except (OSError, ValueError):
        return False


def pid_namespace() -> int:
    try:
        return Path("/proc/self/ns/pid").stat().st_ino
    except OSError:
        return 0


def in_our_pid_namespace(state: InstanceState) -> bool:
    return state.pid_ns in (0, pid_namespace())


def is_stale(state: InstanceState) -> bool:
    """True when the supervisor that wrote `state` is gone. An instance of another PID namespace
    (a container sharing this runtime dir) cannot be judged from here and is never stale."""
    if not in_our_pid_namespace(state):
        return False
    return not process_alive(state.supervisor_pid, state.supervisor_start_ticks)


def clean_stale(base: Path) -> list[str]:
    """Kill what dead supervisors left behind under `base` and remove their dirs; returns their ids."""
    log = structlog.get_logger()
    cleaned = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return []
    for entry in entries:
        if not trust.instance_trusted(entry):
            continue  # not ours alone: its state file could name anyone's processes
        state = read_state(entry)
        if state is None or not is_stale(state):
            continue  # no state yet (an instance being created) or a live supervisor
        for group in state.groups:
            ours = trust.may_signal_group(group.pgid, group.start_ticks, state.supervisor_start_ticks)
            if ours and process_alive(group.pgid, group.start_ticks):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group.pgid, signal.SIGKILL)
                log.warning("killed a leftover process group", instance=state.instance, child=group.name)
        remove_instance_dir(entry)
        log.info("cleaned up the stale instance of a dead supervisor", instance=state.instance)
        cleaned.append(state.instance)
    return cleaned


def remove_instance_dir(path: Path) -> None:
    # rmtree cannot empty a dir it may not write, and something may have made ours read-only.
    with contextlib.suppress(OSError):
        for directory, _, _ in os.walk(path):
            Path(directory).chmod(0o700)
    shutil.rmtree(path, ignore_errors=True)


def now() -> float:
    return time.time()
