"""The per-instance runtime dir: the one owner of its layout, and finding instances in it.

Layout: BASE/INSTANCE/ where BASE is `runtime-dir` from the config, else $XDG_RUNTIME_DIR/agentvm,
else /run/agentvm for root, else /tmp/agentvm-UID. BASE and every instance dir are 0700 and must be
owned by the invoking user. INSTANCE/state.json records the supervisor and its process groups so a
later start (or `list`) can recognise, and clean up after, a supervisor that died without cleaning.
Every file name in INSTANCE/ is named by `InstanceDir` (and nowhere else); `find_instance` is the
one way `attach`, `status` and `stop` turn a name into an instance, and `scan` the one way `list`
and they see what runs.
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
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from supervisor import diskfull, trust, xdg
from supervisor.children import read_start_ticks
from supervisor.errors import ExitCode, SupervisorError

SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the terminating NUL
STATE_FILE = "state.json"
PROG = "agentvm-supervise"


@dataclass(frozen=True)
class InstanceDir:
    """BASE/INSTANCE/ and every file the supervisor and its children keep in it."""

    path: Path

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    @property
    def control_socket(self) -> Path:
        return self.path / "control.sock"

    @property
    def console_socket(self) -> Path:
        return self.path / "console.sock"

    @property
    def qmp_socket(self) -> Path:
        """QEMU's public QMP socket (the private channel is a passed fd)."""
        return self.path / "qmp.sock"

    @property
    def api_socket(self) -> Path:
        """cloud-hypervisor's API socket (a microvm.nix runner's --api-socket, moved here)."""
        return self.path / "api.sock"

    @property
    def egress_socket(self) -> Path:
        """Where the egress proxy takes the guest's connections (supervisor/egress)."""
        return self.path / "egress.sock"

    @property
    def runner_script(self) -> Path:
        """The rewritten copy of a microvm.nix runner."""
        return self.path / "microvm-run"

    def share_socket(self, tag: str) -> Path:
        """The vhost-user socket of share `tag` (virtiofsd serves it, the VM connects)."""
        return self.path / f"{tag}.sock"

    def named_sockets(self) -> list[tuple[Path, str]]:
        """The sockets besides the shares', each with what it is (for the path-length check)."""
        return [
            (self.qmp_socket, "QMP"),
            (self.console_socket, "the console"),
            (self.control_socket, "the control socket"),
            (self.api_socket, "the runner's API"),
            (self.egress_socket, "the egress proxy"),
        ]


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
    temporary = path / f".{STATE_FILE}.tmp"  # beside it: rename is atomic within one dir
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


class StateFile:
    """INSTANCE/state.json kept current: the supervisor and each process group it has started."""

    def __init__(self, files: InstanceDir, *, instance: str, work_dir: Path | None) -> None:
        self._files = files
        self._instance = instance
        self._work_dir = str(work_dir) if work_dir else None
        self._created = now()  # the instance's start, kept across rewrites
        self._ticks = 0
        self._groups: list[GroupRecord] = []

    def begin(self) -> None:
        """The first write, once the instance dir exists."""
        self._ticks = read_start_ticks(os.getpid())
        self._write()

    def add_group(self, name: str, pgid: int, start_ticks: int) -> None:
        self._groups.append(GroupRecord(name, pgid, start_ticks))
        self._write()

    def _write(self) -> None:
        write_state(
            self._files.path,
            InstanceState(
                instance=self._instance,
                supervisor_pid=os.getpid(),
                supervisor_start_ticks=self._ticks,
                created=self._created,
                work_dir=self._work_dir,
                groups=tuple(self._groups),
                pid_ns=pid_namespace(),
            ),
        )


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


@dataclass(frozen=True)
class Found:
    """An instance dir with its state: what a lookup under BASE returns."""

    path: Path
    state: InstanceState

    @property
    def files(self) -> InstanceDir:
        return InstanceDir(self.path)

    @property
    def control_socket(self) -> Path:
        return self.files.control_socket


def scan(base: Path) -> tuple[list[Found], list[Found]]:
    """(live, stale) instances under `base`, each list oldest first (then by id)."""
    live: list[Found] = []
    stale: list[Found] = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return [], []
    for entry in entries:
        state = read_state(entry) if trust.instance_trusted(entry) else None
        if state is None:
            continue  # not an instance dir (or not ours alone), or one being created
        (stale if is_stale(state) else live).append(Found(entry, state))
    live.sort(key=lambda found: found.state.created)
    return live, stale


def find_instance(base: Path, name: str | None, *, verb: str) -> Found:
    """The live instance `name` names: its full id, else a prefix of exactly one live id (e.g.
    the --name it was started with); None when exactly one instance runs. `verb` is the command
    the messages suggest (attach, status, stop)."""
    trust.check_base(base)
    live, stale = scan(base)
    ids = [found.state.instance for found in live]
    if name is None:
        if len(live) == 1:
            return live[0]
        if not live:
            raise SupervisorError(
                f"no running agentvm instance of this user under {base}: start one with '{PROG} run', "
                "or pass the --runtime-dir it was started with",
                exit_code=ExitCode.NO_INPUT,
            )
        raise SupervisorError(
            f"{len(live)} instances are running ({', '.join(ids)}): name one, as in '{PROG} {verb} {ids[0]}'"
        )
    exact = [found for found in live if found.state.instance == name]
    matches = exact or [found for found in live if found.state.instance.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(found.state.instance for found in matches)
        raise SupervisorError(f"'{name}' matches {len(matches)} instances ({names}): give more of the id")
    if any(found.state.instance.startswith(name) for found in stale):
        raise SupervisorError(
            f"no running instance is called '{name}': its supervisor is gone, and '{PROG} list' "
            "cleans up after it",
            exit_code=ExitCode.NO_INPUT,
        )
    raise SupervisorError(
        f"no running instance is called '{name}' under {base} (running: {', '.join(ids) or 'none'}); "
        f"see '{PROG} list'",
        exit_code=ExitCode.NO_INPUT,
    )


def now() -> float:
    return time.time()
