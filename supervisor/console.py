"""The VM console: a PTY the supervisor owns, proxied to the user's terminal.

QEMU's virtconsole is on QEMU's stdio, which is the slave side of a PTY allocated here; the
supervisor keeps the master. While attached to a terminal the terminal is in raw mode, and it is
restored on every way out of `proxy` (normal end, error, cancellation by a signal handler).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import struct
import termios
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
import anyio.to_thread

ESCAPE_DEFAULT = 0x1D  # Ctrl-]
HELP = (
    b"\r\nagentvm-supervise console escape: Ctrl-] then\r\n"
    b"  .  stop the VM (graceful power-off)\r\n"
    b"  ?  this help\r\n"
    b"  Ctrl-]  send Ctrl-] to the guest\r\n"
)


@dataclass
class ConsolePty:
    master: int
    slave: int

    def close_slave(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1

    def close(self) -> None:
        self.close_slave()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


def open_console_pty(size: tuple[int, int] | None) -> ConsolePty:
    master, slave = os.openpty()
    os.set_inheritable(master, False)
    attrs = termios.tcgetattr(slave)
    # QEMU makes the tty raw but leaves output processing on: without this the guest's \r\n
    # would reach the user as \r\r\n.
    attrs[1] &= ~termios.ONLCR
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    if size is not None:
        set_window_size(master, size)
    os.set_blocking(master, False)
    return ConsolePty(master, slave)


def get_window_size(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def set_window_size(fd: int, size: tuple[int, int]) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on a terminal fd for the duration; exactly the previous settings afterwards."""
    saved = termios.tcgetattr(fd)
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await anyio.wait_writable(fd)
            continue
        view = view[written:]


def _pollable(fd: int) -> bool:
    """epoll refuses regular files and /dev/null (EPERM); those never block, but can't be awaited."""
    mode = os.fstat(fd).st_mode
    return not (stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and os.major(os.fstat(fd).st_rdev) == 1))


async def _read(fd: int) -> bytes:
    """Read what is there; b"" at end of file (EIO on a PTY master whose slave is gone)."""
    if not _pollable(fd):
        return await anyio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True)
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


class EscapeReader:
    """Finds the escape key in the user's input; returns what goes to the guest."""

    def __init__(self, escape: int | None, on_command: Callable[[str], None]) -> None:
        self._escape = escape
        self._pending = False
        self._on_command = on_command

    def feed(self, data: bytes) -> bytes:
        if self._escape is None:
            return data
        out = bytearray()
        for byte in data:
            if self._pending:
                self._pending = False
                if byte == self._escape:
                    out.append(byte)
                else:
                    self._on_command(chr(byte))
            elif byte == self._escape:
                self._pending = True
            else:
                out.append(byte)
        return bytes(out)


async def proxy(
    pty: ConsolePty,
    *,
    stdin_fd: int,
    stdout_fd: int,
    escape: int | None,
    on_stop: Callable[[], None],
    on_resize: Callable[[tuple[int, int]], None] | None = None,
) -> None:
    """Copy guest output to `stdout_fd` and user input to the guest until the guest side closes."""
    interactive = os.isatty(stdin_fd)
    stdout_flags = fcntl.fcntl(stdout_fd, fcntl.F_GETFL)

    def command(key: str) -> None:
        if key == ".":
            on_stop()
        elif key == "?":
            with contextlib.suppress(OSError):
                os.write(stdout_fd, HELP)

    escapes = EscapeReader(escape if interactive else None, command)

    async def guest_to_user() -> None:
        while chunk := await _read(pty.master):
            await _write_all(stdout_fd, chunk)
        tg.cancel_scope.cancel()

    async def user_to_guest() -> None:
        while chunk := await _read(stdin_fd):
            data = escapes.feed(chunk)
            if data:
                await _write_all(pty.master, data)

    async def follow_resizes() -> None:
        with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                size = get_window_size(stdin_fd)
                if size is not None:
                    set_window_size(pty.master, size)
                    if on_resize is not None:
                        on_resize(size)

    with raw_terminal(stdin_fd) if interactive else contextlib.nullcontext():
        try:
            os.set_blocking(stdout_fd, False)
            async with anyio.create_task_group() as tg:
                tg.start_soon(guest_to_user)
                tg.start_soon(user_to_guest)
                if interactive:
                    tg.start_soon(follow_resizes)
        finally:
            fcntl.fcntl(stdout_fd, fcntl.F_SETFL, stdout_flags)
