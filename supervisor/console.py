"""The VM console: a PTY the supervisor owns, shown in the user's terminal and on console.sock.

    guest hvc0 - QEMU stdio = PTY slave | master - Console -+- the supervisor's own terminal
                                                            +- console.sock <- `agentvm-supervise attach`
                                                            +- replay buffer, console log
                                                            +- resize port -> the guest's stty

Output is read from the master, passed through the hostile-output filter (termfilter), kept in
the replay buffer and the log (consolelog), and written to the attached terminal. Input comes from
the attached terminal only, with the escape key taken out. One terminal is attached at a time and
the newest attach takes over: the one it displaces is told so and detached, and gets the console
back the same way. The supervisor's own terminal is attached at start; it is in raw mode only while
attached and gets its settings (and the modes the guest switched on, see termmodes) back when it
detaches and on every way out. When stdin is not a terminal there is no raw mode and no escape key:
output still goes to stdout (always, even while an attach holds the console), and input is
forwarded while no attach holds it.

Sizes go to the PTY and, as "ROWS COLS" lines, to the guest over the virtio-serial port
org.agentvm.resize, where a helper applies them to hvc0 (guest/init.sh, nix/guest-resize.nix):
virtconsole itself does not carry the size (microvm.nix#123).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import signal
import socket
import stat
import struct
import termios
import threading
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import structlog

from supervisor import consoleproto as proto
from supervisor.consolelog import ConsoleLog, ReplayBuffer
from supervisor.termfilter import OutputFilter
from supervisor.termmodes import TerminalModes

ESCAPE_DEFAULT = 0x1D  # Ctrl-]
LOCAL_BACKLOG = 256 << 10  # output waiting for the user's terminal before the guest is slowed down
CLIENT_BACKLOG = 8 << 20  # output waiting for an attach client before it is disconnected
INPUT_BACKLOG = 1 << 20  # input waiting for a guest that does not read before it is dropped
READ_BATCH = 64 << 10
YIELD_EVERY = 256 << 10  # a guest that never stops talking must not starve the other tasks
HELLO_TIMEOUT = 10.0
DRAIN_TIMEOUT = 1.0
MSG = "agentvm-supervise"


def parse_escape_key(text: str) -> int | None:
    """'ctrl-]', 'C-]', '^]', a single character, or 'none'; ValueError names the valid forms."""
    lowered = text.strip().lower()
    if lowered == "none":
        return None
    for prefix in ("ctrl-", "c-", "^"):
        if lowered.startswith(prefix) and len(lowered) == len(prefix) + 1:
            code = ord(lowered[-1].upper()) ^ 0x40
            if 0 <= code < 32:
                return code
    if len(text) == 1 and ord(text) < 128:
        return ord(text)
    raise ValueError(
        f"invalid escape key '{text}': use ctrl-X (e.g. ctrl-], ctrl-^), ^X, a single ASCII character, "
        "or none"
    )


def describe_key(code: int) -> str:
    return f"Ctrl-{chr(code ^ 0x40)}" if code < 32 else chr(code)


@dataclass(frozen=True, kw_only=True)
class ConsoleSettings:
    escape: int | None = ESCAPE_DEFAULT
    filter: bool = True
    replay_bytes: int = 64 << 10
    log_dir: Path | None = None  # None: no console log
    log_max_bytes: int = 4 << 20
    log_keep: int = 20


# ---- the PTY and the user's terminal ---------------------------------------------------------


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
        return await anyio.to_thread.run_sync(os.read, fd, READ_BATCH, abandon_on_cancel=True)
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, READ_BATCH)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise


def _read_batch(fd: int) -> bytes | None:
    """Everything readable now from a non-blocking fd, up to READ_BATCH; None if nothing is."""
    chunks: list[bytes] = []
    size = 0
    while size < READ_BATCH:
        try:
            chunk = os.read(fd, READ_BATCH - size)
        except BlockingIOError:
            break
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            chunk = b""
        if not chunk:  # end of file: first hand out what came before it
            if not chunks:
                return b""
            break
        chunks.append(chunk)
        size += len(chunk)
    if not chunks:
        return None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Writer:
    """Writes to a non-blocking fd in order, never blocking the caller: what the fd does not take
    at once waits in a queue that `run` (a task) writes out as the fd becomes writable."""

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


class ThreadWriter:
    """Like Writer, for the user's terminal: the writing happens in a thread of its own.

    A terminal takes a fast guest's output a few KiB at a time; a thread that waits in select()
    costs far less per wake-up than a round of the event loop (bench/console.py: about +40%).
    The thread only writes: errors are reported to `on_error` from the event loop, on the next
    write or wait, and it is stopped and joined when `run` ends.
    """

    POLL = 0.1  # while the terminal takes nothing, the thread checks this often whether to stop

    def __init__(self, fd: int, on_error: Callable[[OSError], None]) -> None:
        self._fd = fd
        self._on_error = on_error
        self._cond = threading.Condition()
        self._queue = bytearray()  # guarded by _cond, like the three below
        self._in_hand = 0  # bytes the thread took from the queue and has not written yet
        self._stopping = False
        self._error: OSError | None = None
        self.failed = False

    @property
    def backlog(self) -> int:
        with self._cond:
            return len(self._queue) + self._in_hand

    def write(self, data: bytes) -> None:
        self._report()
        if self.failed or not data:
            return
        with self._cond:
            self._queue += data
            self._cond.notify_all()

    def abandon(self) -> None:
        self.failed = True
        with self._cond:
            self._queue.clear()
            self._cond.notify_all()

    async def run(self) -> None:
        thread = threading.Thread(target=self._write_out, name="console-terminal-writer", daemon=True)
        thread.start()
        try:
            await anyio.sleep_forever()
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            thread.join(self.POLL * 5)

    async def wait_below(self, limit: int) -> None:
        if self.backlog > limit and not self.failed:
            await anyio.to_thread.run_sync(self._block_until_below, limit, abandon_on_cancel=True)
        self._report()

    def _block_until_below(self, limit: int) -> None:
        with self._cond:
            while len(self._queue) + self._in_hand > limit and not (self._stopping or self._error):
                self._cond.wait()

    def _report(self) -> None:
        if self._error is not None and not self.failed:
            self.failed = True
            self._on_error(self._error)

    def _write_out(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                chunk = bytes(self._queue)
                self._queue.clear()
                self._in_hand = len(chunk)
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:
                    select.select([], [self._fd], [], self.POLL)
                except OSError as exc:
                    with self._cond:
                        self._error = exc
                        self._in_hand = 0
                        self._cond.notify_all()
                    return
                with self._cond:
                    self._in_hand = len(view)
                    self._cond.notify_all()
                    if self._stopping:
                        return


# ---- the escape key --------------------------------------------------------------------------


class EscapeReader:
    """Finds the escape key in the user's input; returns what goes to the guest."""

    def __init__(self, escape: int | None, on_command: Callable[[str], None]) -> None:
        self._escape = escape
        self._pending = False
        self._on_command = on_command

    def feed(self, data: bytes) -> bytes:
        if self._escape is None:
            return data
        if not self._pending and self._escape not in data:
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


def help_text(escape: int) -> bytes:
    key = describe_key(escape)
    return (
        f"\r\n[{MSG} console, {key} then:  . stop the VM  |  d detach  |  ? this help  |  "
        f"{key} send {key} to the guest]\r\n"
    ).encode()


# ---- attachments -----------------------------------------------------------------------------


class Attachment(Protocol):
    """A terminal the console is shown on: the supervisor's own, or an attach client."""

    description: str

    def show(self, data: bytes) -> None: ...

    async def settle(self) -> None: ...

    def displace(self, by: str) -> None: ...


class _LocalTerminal:
    """The supervisor's own stdin/stdout."""

    description = "the supervisor's terminal"

    def __init__(self, console: Console, stdin: int, stdout: int) -> None:
        self._console = console
        self._stdin = stdin
        self.interactive = os.isatty(stdin)
        self._is_terminal = self.interactive or os.isatty(stdout)
        self._mode = TerminalMode(stdin) if self.interactive else None
        self._stdout_flags = fcntl.fcntl(stdout, fcntl.F_GETFL)
        self._stdout = stdout
        os.set_blocking(stdout, False)
        self._out = ThreadWriter(stdout, self._output_failed)
        escape = console.settings.escape if self.interactive else None
        self._escapes = EscapeReader(escape, self._command)
        self.attached = False
        self.gone = False
        self._seen = 0  # replay offset up to which this terminal has shown the output
        self._reset_told = b""
        self._reset_key: tuple[int, bool] | None = None

    # -- the Attachment side

    def show(self, data: bytes) -> None:
        self._out.write(data)
        if self.attached:
            self._tell_reset()

    async def settle(self) -> None:
        await self._out.wait_below(LOCAL_BACKLOG)

    def displace(self, by: str) -> None:
        self.detach(
            f"\r\n[{MSG}: {by} took over the console; the VM keeps running. "
            "Press Enter here to take it back.]\r\n"
        )

    # -- attaching and detaching

    def attach(self) -> None:
        if self.gone or self.attached or self._mode is None:
            return
        self._mode.enter_raw()
        self.attached = True
        replay = self._console.attach(self, get_window_size(self._stdin), since=self._seen)
        self.show(replay)

    def detach(self, message: str) -> None:
        if not self.attached:
            return
        self.attached = False
        self._console.detach(self)
        self._seen = self._console.replay.total
        self._out.write(self._console.modes.undo() + message.encode())
        self._tell_reset()
        if self._mode is not None:
            self._mode.leave_raw()

    def _tell_reset(self) -> None:
        """Keep the watchdog's copy of what would undo the guest's modes current (cheaply)."""
        modes = self._console.modes
        key = (modes.changes, self.attached)
        if key == self._reset_key:
            return
        self._reset_key = key
        reset = modes.undo() if self.attached else b""
        if reset != self._reset_told:
            self._reset_told = reset
            self._console.on_terminal_reset(reset)

    def _command(self, key: str) -> None:
        escape = self._console.settings.escape
        assert escape is not None
        if key == ".":
            self._out.write(f"\r\n[{MSG}: stopping the VM]\r\n".encode())
            self._console.on_stop()
        elif key == "d":
            instance = self._console.instance
            self.detach(
                f"\r\n[{MSG}: detached; the VM keeps running. Attach with "
                f"'agentvm-supervise attach {instance}', or press Enter here.]\r\n"
            )
        elif key == "?":
            self._out.write(help_text(escape))
        else:
            self._out.write(
                f"\r\n[{MSG}: {describe_key(escape)} {key!r} means nothing; ? for help]\r\n".encode()
            )

    # -- the terminal going away

    def _output_failed(self, exc: OSError) -> None:
        if self._is_terminal:
            self._hangup()
        else:  # a closed pipe: stop writing, keep the VM
            structlog.get_logger().warning(
                "stdout closed; console output no longer shown", reason=exc.strerror
            )
            self._console.drop_passive(self)

    def _hangup(self) -> None:
        if self.gone:
            return
        self.gone = True
        self.attached = False
        self._console.detach(self)
        self._console.drop_passive(self)
        self._console.on_hangup()

    # -- tasks

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._out.run)
            if self.interactive:
                tg.start_soon(self._follow_resizes)
            self.attach()
            await self._read_input()
            if self.gone:
                tg.cancel_scope.cancel()

    async def _read_input(self) -> None:
        while not self.gone:
            try:
                data = await read_some(self._stdin)
            except OSError:
                data = b""
            if not data:
                if not self.interactive:
                    return  # stdin at its end: output goes on
                if terminal_alive(self._stdin):
                    continue  # Ctrl-D on the detached, cooked terminal
                self._hangup()
                return
            if not self.interactive:
                if self._console.attached is None:
                    self._console.send_input(data)
            elif self.attached:
                self._console.input_from(self, self._escapes.feed(data))
            elif b"\n" in data or b"\r" in data:
                self.attach()

    async def _follow_resizes(self) -> None:
        with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                size = get_window_size(self._stdin)
                if size is not None and self.attached:
                    self._console.resize_from(self, size)

    async def flush(self) -> None:
        with anyio.move_on_after(DRAIN_TIMEOUT):
            await self._out.wait_below(0)

    def close(self) -> None:
        """Give the terminal back: undo the guest's modes, then the settings and file flags."""
        if self.attached and not self.gone:
            with contextlib.suppress(OSError):
                os.write(self._stdout, self._console.modes.undo())
        self.attached = False
        if self._mode is not None:
            self._mode.close()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._stdout, fcntl.F_SETFL, self._stdout_flags)


class _SocketClient:
    """One connection on console.sock."""

    def __init__(self, console: Console, conn: socket.socket, pid: int) -> None:
        self._console = console
        self._conn = conn
        self.description = f"an attach (pid {pid})"
        self._out = Writer(conn.fileno(), self._failed)
        self._frames = proto.FrameReader()
        self._done = anyio.Event()
        self.finished = anyio.Event()
        self._log = structlog.get_logger().bind(client_pid=pid)

    def show(self, data: bytes) -> None:
        for start in range(0, len(data), proto.MAX_PAYLOAD):
            self._out.write(proto.frame(proto.Kind.OUTPUT, data[start : start + proto.MAX_PAYLOAD]))
        if self._out.backlog > CLIENT_BACKLOG:
            self._log.warning("attach client does not keep up; disconnecting it", backlog=self._out.backlog)
            self._out.abandon()
            self._done.set()

    async def settle(self) -> None:
        return

    def displace(self, by: str) -> None:
        self.end(f"{by} took over the console; the VM keeps running")

    def end(self, text: str) -> None:
        self._out.write(proto.message(proto.Kind.NOTICE, proto.Notice(text=text, end=True)))
        self._done.set()

    def _failed(self, exc: OSError) -> None:
        self._done.set()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._out.run)
                tg.start_soon(self._receive)
                await self._done.wait()
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    await self._out.wait_below(0)
                tg.cancel_scope.cancel()
        finally:
            self._console.detach(self)
            self.finished.set()

    async def _next_frames(self) -> list[tuple[proto.Kind, bytes]]:
        while True:
            try:
                data = self._conn.recv(65536)
            except BlockingIOError:
                await anyio.wait_readable(self._conn)
                continue
            if not data:
                raise EOFError
            frames = self._frames.feed(data)
            if frames:
                return frames

    async def _receive(self) -> None:
        try:
            with anyio.fail_after(HELLO_TIMEOUT):
                frames = await self._next_frames()
            kind, payload = frames.pop(0)
            if kind is not proto.Kind.HELLO:
                raise proto.ProtocolError(f"expected HELLO, got {kind.name}")
            hello = proto.decode(payload, proto.Hello)
            if hello.version != proto.VERSION:
                self.end(
                    f"this supervisor speaks console protocol {proto.VERSION}, the attach speaks "
                    f"{hello.version}: use the agentvm-supervise that started the VM"
                )
                return
            size = (hello.rows, hello.cols) if hello.rows and hello.cols else None
            welcome = proto.Welcome(version=proto.VERSION, instance=self._console.instance)
            self._out.write(proto.message(proto.Kind.WELCOME, welcome))
            self.show(self._console.attach(self, size))
            self._log.info("console attached")
            while True:
                for kind, payload in frames:
                    self._handle(kind, payload)
                frames = await self._next_frames()
        except (EOFError, ConnectionError):
            pass
        except TimeoutError:
            self._log.warning("attach client sent no HELLO in time; closing it")
        except proto.ProtocolError as exc:
            self._log.warning("attach client broke the console protocol; closing it", reason=str(exc))
        finally:
            self._done.set()

    def _handle(self, kind: proto.Kind, payload: bytes) -> None:
        if kind is proto.Kind.INPUT:
            self._console.input_from(self, payload)
        elif kind is proto.Kind.RESIZE:
            size = proto.decode(payload, proto.Size)
            self._console.resize_from(self, (size.rows, size.cols))
        elif kind is proto.Kind.STOP:
            if self._console.attached is self:
                self._console.on_stop()
        else:
            raise proto.ProtocolError(f"unexpected {kind.name} frame from a client")


def _peer(conn: socket.socket) -> tuple[int, int]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def bind_console_socket(path: Path) -> socket.socket:
    """Listen on console.sock, 0600 (its dir is 0700 too)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(os.fsencode(path))
        path.chmod(0o600)
        listener.listen(8)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


# ---- the console -----------------------------------------------------------------------------


class Console:
    def __init__(
        self,
        pty: ConsolePty,
        *,
        instance: str,
        settings: ConsoleSettings,
        size: tuple[int, int] | None,
        on_stop: Callable[[], None],
        on_hangup: Callable[[], None] = lambda: None,
        on_terminal_reset: Callable[[bytes], None] = lambda reset: None,
        resize_port: socket.socket | None = None,
        log: ConsoleLog | None = None,
    ) -> None:
        self.instance = instance
        self.settings = settings
        self.on_stop = on_stop
        self.on_hangup = on_hangup
        self.on_terminal_reset = on_terminal_reset
        self.replay = ReplayBuffer(settings.replay_bytes)
        self.modes = TerminalModes()
        self.attached: Attachment | None = None
        self._pty = pty
        self._size = size
        self._resize_port = resize_port
        self._log = log
        # With the filter on, it hands the mode-switching sequences to the tracker, which then
        # need not scan the output; without it, the tracker scans.
        self._filter = OutputFilter(on_sequence=self.modes.sequence) if settings.filter else None
        self._passive: _LocalTerminal | None = None
        self._input = Writer(pty.master, lambda exc: None)
        self._clients: list[_SocketClient] = []
        self._logger = structlog.get_logger().bind(instance=instance)

    async def run(self, *, stdin_fd: int, stdout_fd: int, listener: socket.socket | None = None) -> None:
        """Serve the console until the guest side of the PTY closes (QEMU exited)."""
        local = _LocalTerminal(self, stdin_fd, stdout_fd)
        if not local.interactive:
            self._passive = local
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._input.run)
                tg.start_soon(local.run)
                if listener is not None:
                    tg.start_soon(self._serve, listener, tg)
                await self._pump()
                for client in self._clients:
                    client.end("the VM stopped")
                await local.flush()
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    for client in list(self._clients):
                        await client.finished.wait()
                tg.cancel_scope.cancel()
        finally:
            local.close()

    # -- output

    async def _pump(self) -> None:
        master = self._pty.master
        since_yield = 0
        while True:
            data = _read_batch(master)
            if data is None:
                await anyio.wait_readable(master)
                since_yield = 0
                continue
            if not data:
                break
            self._publish(self._filter.feed(data) if self._filter is not None else data)
            if self._passive is not None:
                await self._passive.settle()
            if self.attached is not None:
                await self.attached.settle()
            since_yield += len(data)
            if since_yield >= YIELD_EVERY:
                since_yield = 0
                await anyio.lowlevel.checkpoint()
        if self._filter is not None:
            self._publish(self._filter.flush())

    def _publish(self, data: bytes) -> None:
        if not data:
            return
        self.replay.append(data)
        if self._filter is None:
            self.modes.feed(data)
        if self._log is not None:
            self._log.write(data)
        if self._passive is not None:
            self._passive.show(data)
        if self.attached is not None and self.attached is not self._passive:
            self.attached.show(data)

    def drop_passive(self, local: _LocalTerminal) -> None:
        if self._passive is local:
            self._passive = None

    # -- attachments

    def attach(self, who: Attachment, size: tuple[int, int] | None, *, since: int | None = None) -> bytes:
        """`who` holds the console now; returns what it must show first (the replay)."""
        previous, self.attached = self.attached, who
        if previous is not None and previous is not who:
            previous.displace(who.description)
        if size is not None:
            self.resize(size)
        self._logger.info("console attached", to=who.description)
        return self.modes.before_replay() + self.replay.since(since) + self.modes.after_replay()

    def detach(self, who: Attachment) -> None:
        if self.attached is who:
            self.attached = None
            self._logger.info("console detached", was=who.description)

    def input_from(self, who: Attachment, data: bytes) -> None:
        if self.attached is who:
            self.send_input(data)

    def send_input(self, data: bytes) -> None:
        if self._input.backlog > INPUT_BACKLOG:
            return  # the guest has not read its input for a long while; typing more will not help
        self._input.write(data)

    def resize_from(self, who: Attachment, size: tuple[int, int]) -> None:
        if self.attached is who:
            self.resize(size)

    def resize(self, size: tuple[int, int]) -> None:
        rows, cols = size
        if not (0 < rows < 65536 and 0 < cols < 65536) or size == self._size:
            return
        self._size = size
        with contextlib.suppress(OSError):
            set_window_size(self._pty.master, size)
        if self._resize_port is not None:
            # Dropped when full: a guest without the helper never reads the port, and only the
            # latest size matters to one that does.
            with contextlib.suppress(OSError):
                self._resize_port.send(f"{rows} {cols}\n".encode())
        self._logger.info("console resized", rows=rows, cols=cols)

    # -- console.sock

    async def _serve(self, listener: socket.socket, tg: anyio.abc.TaskGroup) -> None:
        while True:
            await anyio.wait_readable(listener)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # out of fds: say so, and give the others time to finish
                self._logger.warning("cannot accept a console connection", reason=exc.strerror)
                await anyio.sleep(0.5)
                continue
            tg.start_soon(self._serve_client, conn)

    async def _serve_client(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            pid, uid = _peer(conn)
            if uid not in (os.geteuid(), 0):
                self._logger.warning("refused a console connection from another user", uid=uid, pid=pid)
                return
            client = _SocketClient(self, conn, pid)
            self._clients.append(client)
            try:
                await client.run()
            finally:
                self._clients.remove(client)
