"""The watchdog: cleans up after the supervisor when the supervisor is killed outright.

Children already die with the supervisor (PR_SET_PDEATHSIG), but their forks (virtiofsd's sandbox
child), their sockets and the runtime dir would not. So before the event loop starts (fork is only
safe without threads) the supervisor forks this small process, which at once execs
`python -m supervisor.watchdog` with an environment without secrets (a fork would keep the
supervisor's API keys in /proc/PID/environ for as long as it lives). It sits in its own session,
ignores terminal and termination signals, and reads a pipe on which the supervisor announces the
runtime dir and each process group, one NUL-terminated message each: a path cannot hold a NUL, while
a newline once split "dir /tmp/x/precious\nx" into a removal of /tmp/x/precious. When the pipe
reaches EOF without the word "done" (the supervisor died without cleaning up), it SIGKILLs every
announced group and removes the runtime dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import termios
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TTY_FD = 200  # where the terminal is kept across the exec, out of the way of the std streams


class Watchdog:
    def __init__(self, write_fd: int, pid: int) -> None:
        self._write_fd = write_fd
        self.pid = pid

    @classmethod
    def start(cls, *, env: Mapping[str, str], tty_fd: int | None = None) -> Watchdog:
        """Start the watchdog with environment `env`. With `tty_fd`, it also restores that terminal's
        current settings."""
        saved = "-"
        if tty_fd is not None:
            attrs = termios.tcgetattr(tty_fd)
            flags = fcntl.fcntl(tty_fd, fcntl.F_GETFL)
            cc = [c if isinstance(c, int) else c[0] for c in attrs[6]]
            saved = ",".join(map(str, [*attrs[:6], flags])) + ";" + ",".join(map(str, cc))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        argv = [sys.executable, "-m", "supervisor.watchdog", str(read_fd), saved]
        environment = dict(env)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked process
            try:
                _exec(argv, environment, read_fd, tty_fd)
            finally:
                os._exit(127)
        os.close(read_fd)
        return cls(write_fd, pid)

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write_fd, os.fsencode(line) + b"\0")

    def guard_dir(self, path: Path) -> None:
        self._send(f"dir {path}")

    def guard_group(self, pgid: int) -> None:
        self._send(f"group {pgid}")

    def release_group(self, pgid: int) -> None:
        self._send(f"release {pgid}")

    def guard_terminal_modes(self, reset: bytes) -> None:
        """Bytes that undo the modes the guest left on in the terminal (the console keeps this current)."""
        self._send(f"tty-reset {reset.hex()}")

    def close(self) -> None:
        """Everything is cleaned up: let the watchdog exit without touching anything."""
        self._send("done")
        with contextlib.suppress(OSError):
            os.close(self._write_fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _exec(
    argv: list[str], env: dict[str, str], read_fd: int, tty_fd: int | None
) -> None:  # pragma: no cover - runs in the forked process
    # Its own session first: a Ctrl-C on the terminal must not reach it before it ignores SIGINT.
    os.setsid()
    # Keep the terminal only as a high fd to restore it; std streams go to /dev/null so a caller
    # reading our output through a pipe is not kept waiting by this process.
    if tty_fd is not None:
        os.dup2(tty_fd, TTY_FD)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = sorted({read_fd, *([TTY_FD] if tty_fd is not None else [])})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
        os.set_inheritable(fd, True)
    os.closerange(low, 65536)
    os.execve(argv[0], argv, env)  # noqa: S606 - our own interpreter, a fixed argv


def _saved_tty(text: str) -> tuple[list[Any], int] | None:
    if text == "-":
        return None
    head, _, cc = text.partition(";")
    numbers = [int(part) for part in head.split(",")]
    return [*numbers[:6], [int(part) for part in cc.split(",")]], numbers[6]


def main(argv: list[str]) -> None:  # pragma: no cover - runs in the watchdog process
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_IGN)
    saved_tty = _saved_tty(argv[2])
    _watch(int(argv[1]), TTY_FD if saved_tty is not None else None, saved_tty)


def _watch(read_fd: int, kept_tty: int | None, saved_tty: tuple[list[Any], int] | None) -> None:
    dirs: list[str] = []
    groups: set[int] = set()
    tty_reset = b""
    buffer = b""
    while True:
        try:
            chunk = os.read(read_fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buffer += chunk
        *messages, buffer = buffer.split(b"\0")
        for raw in messages:
            verb, _, arg = os.fsdecode(raw).partition(" ")
            if verb == "done":
                return
            if verb == "dir":
                dirs.append(arg)
            elif verb == "group":
                groups.add(int(arg))
            elif verb == "release":
                groups.discard(int(arg))
            elif verb == "tty-reset":
                tty_reset = bytes.fromhex(arg)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    if dirs:
        from supervisor.runtime import remove_instance_dir  # only now: a slow import, rarely needed

        for path in dirs:
            remove_instance_dir(Path(path))
    if kept_tty is not None and saved_tty is not None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(kept_tty, termios.TCSANOW, saved_tty[0])
            fcntl.fcntl(kept_tty, fcntl.F_SETFL, saved_tty[1])
            if tty_reset:  # e.g. mouse reporting or the alternate screen the guest's TUI left on
                os.write(kept_tty, tty_reset)


if __name__ == "__main__":  # pragma: no cover - the watchdog process
    main(sys.argv)
