"""The watchdog: cleans up after the supervisor when the supervisor is killed outright.

Children already die with the supervisor (PR_SET_PDEATHSIG), but their forks (virtiofsd's sandbox
child), their sockets and the runtime dir would not. So before the event loop starts (fork is only
safe without threads) the supervisor forks this small process. It sits in its own session, ignores
terminal and termination signals, and reads a pipe on which the supervisor announces the runtime
dir and each process group. When the pipe reaches EOF without the word "done" (the supervisor died
without cleaning up), it SIGKILLs every announced group and removes the runtime dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import termios
from pathlib import Path
from typing import Any

from supervisor import tap
from supervisor.runtime import remove_instance_dir


class Watchdog:
    def __init__(self, write_fd: int, pid: int) -> None:
        self._write_fd = write_fd
        self.pid = pid

    @classmethod
    def start(cls, *, tty_fd: int | None = None) -> Watchdog:
        """Fork the watchdog. With `tty_fd`, it also restores that terminal's current settings."""
        saved_tty = None
        if tty_fd is not None:
            saved_tty = (termios.tcgetattr(tty_fd), fcntl.fcntl(tty_fd, fcntl.F_GETFL))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked process
            os.close(write_fd)
            try:
                _watch(read_fd, tty_fd, saved_tty, supervisor)
            finally:
                os._exit(0)
        os.close(read_fd)
        return cls(write_fd, pid)

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write_fd, (line + "\n").encode("utf-8", "surrogateescape"))

    def guard_dir(self, path: Path) -> None:
        self._send(f"dir {path}")

    def guard_group(self, pgid: int) -> None:
        self._send(f"group {pgid}")

    def release_group(self, pgid: int) -> None:
        self._send(f"release {pgid}")

    def guard_tap(self, name: str) -> None:
        """A tap (tap.py) to delete if the supervisor dies; only while it still carries our mark."""
        self._send(f"tap {name}")

    def release_tap(self, name: str) -> None:
        self._send(f"untap {name}")

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


def _remove_taps(names: set[str], supervisor: int) -> None:  # pragma: no cover - in the watchdog
    """The taps the dead supervisor made (its pid is in their mark: a zombie supervisor still looks
    alive to tap.Owner.alive, and a tap someone else made since then is left alone)."""
    for name in names:
        with contextlib.suppress(Exception):  # one tap that cannot go must not keep the others
            tap.remove_owned(name, supervisor)


def _watch(
    read_fd: int, tty_fd: int | None, saved_tty: tuple[list[Any], int] | None, supervisor: int
) -> None:  # pragma: no cover - runs in the forked process
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_IGN)
    # Keep the terminal only as a high fd to restore it; std streams go to /dev/null so a caller
    # reading our output through a pipe is not kept waiting by this process.
    kept_tty = fcntl.fcntl(tty_fd, fcntl.F_DUPFD_CLOEXEC, 200) if tty_fd is not None else None
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    keep = sorted({read_fd, *([kept_tty] if kept_tty is not None else [])})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)
    dirs: list[str] = []
    groups: set[int] = set()
    taps: set[str] = set()
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
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            verb, _, arg = raw.decode("utf-8", "surrogateescape").partition(" ")
            if verb == "done":
                return
            if verb == "dir":
                dirs.append(arg)
            elif verb == "group":
                groups.add(int(arg))
            elif verb == "release":
                groups.discard(int(arg))
            elif verb == "tap":
                taps.add(arg)
            elif verb == "untap":
                taps.discard(arg)
            elif verb == "tty-reset":
                tty_reset = bytes.fromhex(arg)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for path in dirs:
        remove_instance_dir(Path(path))
    if taps:  # after the kill: the runner no longer holds them
        _remove_taps(taps, supervisor)
    if kept_tty is not None and saved_tty is not None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(kept_tty, termios.TCSANOW, saved_tty[0])
            fcntl.fcntl(kept_tty, fcntl.F_SETFL, saved_tty[1])
            if tty_reset:  # e.g. mouse reporting or the alternate screen the guest's TUI left on
                os.write(kept_tty, tty_reset)
