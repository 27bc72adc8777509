"""Readiness: a child's socket appearing, raced against the child's death, under a deadline.

Spawned is not ready (s6). In `--fd` mode the supervisor bound the socket itself, so a virtiofsd is
ready the moment it exists; this module serves `--socket-path` mode, where readiness is the socket
appearing in the runtime dir. It is observed with inotify, never by polling and never by connecting
(a virtiofsd serves exactly one front-end and exits when that one disconnects).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import anyio

from supervisor.children import Child
from supervisor.errors import ExitCode, SupervisorError
from supervisor.inotify import IN_CREATE, IN_DELETE_SELF, IN_MOVED_TO, Inotify

SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags" of a listening socket
LISTEN_RECHECK_S = 0.002


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def _is_listening(path: Path) -> bool:
    """Whether a unix socket bound at `path` accepts connections, from /proc/net/unix.

    The socket file appears at bind(), before listen(): a connect in between is refused. When
    /proc/net/unix cannot tell (not mounted, another network namespace), the file is taken as ready.
    """
    try:
        lines = Path("/proc/net/unix").read_text(errors="surrogateescape").splitlines()[1:]
    except OSError:
        return True
    target = os.fsdecode(path)
    seen = False
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == target:
            seen = True
            if int(fields[3], 16) & SO_ACCEPTCON:
                return True
    return not seen


async def _wait_listening(path: Path) -> None:
    # No event marks listen(); bind() -> listen() is microseconds unless the daemon is preempted
    # or stopped right there, so a short re-check is cheap and rare.
    while not _is_listening(path):
        await anyio.sleep(LISTEN_RECHECK_S)


async def wait_socket(path: Path, child: Child, *, timeout: float, owner: str) -> float:
    """Wait until `path` is a listening socket; fail if `child` exits first or `timeout` passes.

    `owner` names the child for the error ("virtiofsd for share 'work'"). Returns the seconds waited.
    """
    started = anyio.current_time()
    outcome: list[str] = []
    with Inotify() as inotify:
        # Watch first, then look: a socket created between the two is still seen.
        inotify.add_watch(path.parent, IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF)
        if _is_socket(path) and _is_listening(path):
            return 0.0

        async def socket_appears() -> None:
            while not _is_socket(path):
                for mask, name in await inotify.read_events():
                    if mask & IN_DELETE_SELF:
                        outcome.append("dir-removed")
                        tg.cancel_scope.cancel()
                        return
                    if name == path.name and _is_socket(path):
                        break
            await _wait_listening(path)
            outcome.append("ready")
            tg.cancel_scope.cancel()

        async def child_exits() -> None:
            await child.exited.wait()
            outcome.append("exited")
            tg.cancel_scope.cancel()

        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                tg.start_soon(socket_appears)
                tg.start_soon(child_exits)
    waited = anyio.current_time() - started
    first = outcome[0] if outcome else "timeout"
    if first == "ready":
        return waited
    if first == "exited" and _is_socket(path):
        # It created the socket and exited right after: ready, and its death is reported elsewhere.
        return waited
    stderr = child.stderr_excerpt()
    said = f" Its last output: {stderr}." if stderr else ""
    if first == "exited":
        raise SupervisorError(
            f"{owner} (pid {child.pid}) exited ({child.describe_status()}) before creating its socket "
            f"{path}.{said} Check the share directory and the virtiofsd flags it was given (run with "
            "--debug to see its full command line).",
            exit_code=ExitCode.SHARE_FAILED,
        )
    if first == "dir-removed":
        raise SupervisorError(
            f"the runtime dir {path.parent} was removed while {owner} was starting; another "
            "process is deleting it (a cleanup job, or a second supervisor): keep it out of that dir",
            exit_code=ExitCode.CANT_CREATE,
        )
    raise SupervisorError(
        f"{owner} (pid {child.pid}) did not create its socket {path} within {timeout:g} s.{said} "
        "It may be hanging or too slow on this machine: raise timeouts.socket-ready, or use "
        'virtiofsd.socket-mode = "fd", which needs no wait.',
        exit_code=ExitCode.SHARE_FAILED,
    )
