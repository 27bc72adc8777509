"""The terminal side of the console: the PTY, window sizes, raw mode, reading and writing fds."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread

READ_SIZE = 64 << 10


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


class TerminalMode:
    """Raw mode on a terminal on demand; its settings and file flags exactly as before afterwards.

    Restoring never raises and never waits (TCSANOW): the terminal may be hung up (its tmux pane
    closed), and a terminal that does not drain must not keep the supervisor from exiting.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._saved = termios.tcgetattr(fd)
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self.raw = False

    def enter_raw(self) -> None:
        tty.setraw(self._fd, termios.TCSANOW)
        self.raw = True

    def leave_raw(self) -> None:
        self.raw = False
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(self._fd, termios.TCSANOW, self._saved)

    def close(self) -> None:
        self.leave_raw()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, fcntl.F_SETFL, self._flags)


def terminal_alive(fd: int) -> bool:
    """False once the terminal is hung up (a closed pane): its ioctls then fail with EIO."""
    try:
        termios.tcgetattr(fd)
    except (termios.error, OSError):
        return False
    return True


# ---- reading and writing without blocking the event loop -------------------------------------


def _pollable(fd: int) -> bool:
    """epoll refuses regular files and /dev/null (EPERM); those never block, but can't be awaited."""
    info = os.fstat(fd)
    return not (stat.S_ISREG(info.st_mode) or (stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == 1))


async def read_some(fd: int) -> bytes:
    """Read what is there; b"" at end of file (EIO on a PTY master whose slave is gone)."""
    if not _pollable(fd):
        return await anyio.to_thread.run_sync(os.read, fd, READ_SIZE, abandon_on_cancel=True)
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, READ_SIZE)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


class Writer:
    """Writes to a non-blocking fd in order, never blocking the caller: what the fd does not take
    at once waits in a queue that `run` (a task) writes out as the fd becomes writable. For input
    and the attach client; output to terminals goes through console/output.py."""

    def __init__(self, fd: int, on_error: Callable[[OSError], None]) -> None:
        self._fd = fd
        self._on_error = on_error
        self._queue = bytearray()
        self._queued = anyio.Event()
        self._room = anyio.Event()
        self.failed = False

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def write(self, data: bytes) -> None:
        if self.failed or not data:
            return
        view = memoryview(data)
        if not self._queue:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                self._fail(exc)
                return
            view = view[written:]
            if not view:
                return
        self._queue += view
        self._queued.set()

    async def run(self) -> None:
        while not self.failed:
            await self._queued.wait()
            self._queued = anyio.Event()
            while self._queue and not self.failed:
                await anyio.wait_writable(self._fd)
                try:
                    written = os.write(self._fd, self._queue)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(exc)
                    break
                del self._queue[:written]
                self._wake_waiters()

    def abandon(self) -> None:
        """Stop writing; what is queued is dropped."""
        self.failed = True
        self._queue.clear()
        self._wake_waiters()

    async def wait_below(self, limit: int) -> None:
        while len(self._queue) > limit and not self.failed:
            await self._room.wait()

    def _wake_waiters(self) -> None:
        self._room.set()
        self._room = anyio.Event()

    def _fail(self, exc: OSError) -> None:
        self.abandon()
        self._on_error(exc)


async def recv_some(conn: socket.socket, size: int = 64 << 10) -> bytes:
    """What the non-blocking socket `conn` has (b"" at its end), once it has something."""
    while True:
        try:
            return conn.recv(size)
        except BlockingIOError:
            await anyio.wait_readable(conn)
