"""The watchdog: cleans up after the supervisor when the supervisor is killed outright.

Children already die with the supervisor (PR_SET_PDEATHSIG), but their forks (virtiofsd's sandbox
child), their sockets and the runtime dir would not. So before anything is started the supervisor
starts this small process (watchdog_main.py: a bare interpreter, none of the supervisor's imports)
in a session of its own. It ignores terminal and termination signals and reads a pipe on which the
supervisor announces the terminal's settings, the runtime dir and each process group. When the
pipe reaches EOF without the word "done" (the supervisor died without cleaning up), it SIGKILLs
every announced group, removes the runtime dir and restores the terminal.

The protocol: messages `VERB ARG`, each terminated by a NUL, written here (`_send`) and parsed in
watchdog_main.parse. A path cannot hold a NUL, while a newline once split "dir /tmp/x/precious\nx"
into a removal of /tmp/x/precious (issue 11, D6).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import termios
from pathlib import Path

from supervisor.launcher import child_environment

MAIN = Path(__file__).with_name("watchdog_main.py")


class Watchdog:
    def __init__(self, write_fd: int, proc: subprocess.Popen[bytes]) -> None:
        self._write_fd = write_fd
        self._proc = proc
        self.pid = proc.pid

    @classmethod
    def start(cls, *, tty_fd: int | None = None) -> Watchdog:
        """Start the watchdog. With `tty_fd`, it also restores that terminal's current settings."""
        saved = None
        if tty_fd is not None:
            saved = (termios.tcgetattr(tty_fd), fcntl.fcntl(tty_fd, fcntl.F_GETFL))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        # Its own copy of the terminal, as a plain fd: its std streams go to /dev/null, so that a
        # caller reading our output through a pipe is not kept waiting by this process.
        kept_tty = fcntl.fcntl(tty_fd, fcntl.F_DUPFD_CLOEXEC, 3) if tty_fd is not None else None
        fds = [read_fd] if kept_tty is None else [read_fd, kept_tty]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(MAIN), *map(str, fds)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=fds,
                start_new_session=True,  # out of the terminal's reach (Ctrl-C, hangup) from the start
                env=child_environment(os.environ, {}),  # no API key (issue 11, D8)
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        watchdog = cls(write_fd, proc)
        if saved is not None:
            attrs, file_flags = saved
            cc = bytes(c if isinstance(c, int) else c[0] for c in attrs[6]).hex()
            watchdog._send(f"tty-saved {' '.join(map(str, attrs[:6]))} {cc} {file_flags}")
        return watchdog

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write_fd, (line + "\0").encode("utf-8", "surrogateescape"))

    def guard_dir(self, path: Path) -> None:
        self._send(f"dir {path}")

    def guard_group(self, pgid: int) -> None:
        self._send(f"group {pgid}")

    def release_group(self, pgid: int) -> None:
        self._send(f"release {pgid}")

    def guard_tap(self, name: str) -> None:
        """A tap (tap.py) to delete if the supervisor dies, if it still carries the supervisor's mark."""
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
        self._proc.wait()
