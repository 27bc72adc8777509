"""The watchdog process (see watchdog.py), run as `python -I -S watchdog_main.py READ_FD [TTY_FD]`.

It imports nothing of the supervisor (nor anything beyond a few stdlib modules: -I -S keep even
site-packages out), so it costs a few MiB rather than a second supervisor's worth (issue 17).
It sits in its own session (its parent started it so), reads the supervisor's announcements from
READ_FD, and at EOF without "done" (the supervisor died without cleaning up) SIGKILLs every
announced process group, removes the announced dirs and restores the terminal TTY_FD.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import termios
import time

TYPE_CHECKING = False  # typing itself is more to import than this whole process needs
if TYPE_CHECKING:
    from typing import Any


def parse(buffer: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """The protocol, parsed in this one place: complete messages `VERB ARG\\0` as (verb, arg),
    and what is left of an incomplete last one."""
    *lines, rest = buffer.split(b"\0")
    messages = []
    for raw in lines:
        verb, _, arg = raw.decode("utf-8", "surrogateescape").partition(" ")
        messages.append((verb, arg))
    return messages, rest


def _saved_tty(arg: str) -> tuple[list[Any], int]:
    """`tty-saved IFLAG OFLAG CFLAG LFLAG ISPEED OSPEED CC-HEX FILE-FLAGS`: the terminal's settings
    when the supervisor started (tcgetattr, fcntl F_GETFL), to restore."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc, file_flags = arg.split(" ")
    attrs: list[Any] = [int(iflag), int(oflag), int(cflag), int(lflag), int(ispeed), int(ospeed)]
    attrs.append(list(bytes.fromhex(cc)))  # tcsetattr takes each control character as an int
    return attrs, int(file_flags)


def _remove_dir(path: str) -> None:
    """rm -rf, also of dirs something made read-only (shutil would import compression modules,
    several MiB, for nothing). The walk does not follow symlinks; unlink removes the link."""
    with contextlib.suppress(OSError):
        for directory, _, _ in os.walk(path):
            os.chmod(directory, 0o700)  # noqa: PTH101 - pathlib is more to import, for nothing
    for directory, subdirs, files in os.walk(path, topdown=False):
        for name in files:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))  # noqa: PTH108, PTH118
        for name in subdirs:
            with contextlib.suppress(OSError):
                entry = os.path.join(directory, name)  # noqa: PTH118
                if os.path.islink(entry):  # noqa: PTH114
                    os.unlink(entry)  # noqa: PTH108
                else:
                    os.rmdir(entry)  # noqa: PTH106
    with contextlib.suppress(OSError):
        os.rmdir(path)  # noqa: PTH106


def _remove_taps(names: set[str], supervisor: int) -> None:
    """Taps need netlink (pyroute2, tap.py): a helper run only now, on this rare path, does it:
    `python -m supervisor.tap PID NAME...` deletes each tap still marked with the dead supervisor's
    pid (and a bridge it made, once unused). Bounded: a stuck helper must not keep the watchdog."""
    # -I: not the cwd (often the agent's writable project dir) nor PYTHON* variables on the path
    argv = [sys.executable, "-I", "-m", "supervisor.tap", str(supervisor), *sorted(names)]
    with contextlib.suppress(OSError):
        pid = os.posix_spawn(sys.executable, argv, dict(os.environ))
        for _ in range(200):  # 10 s
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def main(argv: list[str]) -> None:
    supervisor = os.getppid()  # while it lives: it started this process
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(signum, signal.SIG_IGN)
    read_fd = int(argv[1])
    tty_fd = int(argv[2]) if len(argv) > 2 else None
    dirs: list[str] = []
    groups: set[int] = set()
    taps: set[str] = set()
    saved_tty: tuple[list[Any], int] | None = None
    tty_reset = b""
    buffer = b""
    while True:
        try:
            chunk = os.read(read_fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        messages, buffer = parse(buffer + chunk)
        for verb, arg in messages:
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
            elif verb == "tty-saved":
                saved_tty = _saved_tty(arg)
            elif verb == "tty-reset":
                tty_reset = bytes.fromhex(arg)
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    for path in dirs:
        _remove_dir(path)
    if taps:  # after the kill: the runner no longer holds them
        _remove_taps(taps, supervisor)
    if tty_fd is not None and saved_tty is not None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(tty_fd, termios.TCSANOW, saved_tty[0])
            fcntl.fcntl(tty_fd, fcntl.F_SETFL, saved_tty[1])
            if tty_reset:  # e.g. mouse reporting or the alternate screen the guest's TUI left on
                os.write(tty_fd, tty_reset)


if __name__ == "__main__":
    main(sys.argv)
