"""The VM console: a PTY the supervisor owns, shown in the user's terminal and on console.sock.

    guest hvc0 - QEMU stdio = PTY slave | master - Console -+- the supervisor's own terminal
                                                            +- console.sock <- `agentvm-supervise attach`
                                                            +- replay buffer, console log
                                                            +- resize port -> the guest's stty

Output is read from the master, passed through the hostile-output filter (termfilter), kept in
the replay buffer and the log (consolelog), and written to the attached terminal, all by a thread
of its own (consoleout: a copy loop costs far less per read than a round of the event loop). Input,
attaches and resizes are event-loop tasks. Input comes from the attached terminal only, with the
escape key taken out. One terminal is attached at a time and
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
import signal
import socket
import stat
import struct
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from supervisor import consoleproto as proto
from supervisor.consolelog import ConsoleLog, ReplayBuffer
from supervisor.consoleout import OutputPump, Sink
from supervisor.termfilter import OutputFilter
from supervisor.termmodes import TerminalModes

ESCAPE_DEFAULT = 0x1D  # Ctrl-]
BACKLOG = 256 << 10  # output waiting for the terminal that shows it before the guest is slowed down
CLIENT_STALL = 10.0  # seconds an attach client may take nothing, its backlog full, before it goes
INPUT_BACKLOG = 1 << 20  # input waiting for a guest that does not read before it is dropped
READ_SIZE = 64 << 10
HELLO_TIMEOUT = 10.0
# Connections console.sock holds at once (as control.MAX_CONNECTIONS): a flood of them held the
# supervisor at its fd limit. A client past the cap is closed at once.
MAX_CONNECTIONS = 16
DRAIN_TIMEOUT = 1.0
LOG_FLUSH_DELAY = 0.2
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
    and the attach client; output to terminals goes through consoleout."""

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
    """A terminal the console is shown on: the supervisor's own, or an attach client.

    `show` and `holds_back` are called with the console's lock held, from the output thread or the
    event loop; `displace` from the event loop, with the lock held.
    """

    description: str

    def show(self, data: bytes) -> None: ...

    def holds_back(self, now: float) -> bool:
        """Whether output should wait: this terminal is BACKLOG behind (the guest then slows
        down to its pace, as a program does to its terminal's)."""
        ...

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
        self.out = Sink(stdout, wake_pump=console.wake_pump, on_error=self._output_failed)
        escape = console.settings.escape if self.interactive else None
        self._escapes = EscapeReader(escape, self._command)
        self.attached = False
        self.gone = False
        self._seen = 0  # replay offset up to which this terminal has shown the output
        self._reset_told = b""
        self._reset_key: tuple[int, bool] | None = None

    # -- the Attachment side

    def show(self, data: bytes) -> None:
        self.out.write(data)
        if self.attached:
            self._tell_reset()

    def holds_back(self, now: float) -> bool:
        return self.out.backlog > BACKLOG

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
        self._console.attach(self, get_window_size(self._stdin), since=self._seen)

    def detach(self, message: str) -> None:
        with self._console.lock:
            if not self.attached:
                return
            self.attached = False
            self._console.detach(self)
            self._seen = self._console.replay.total
            self.out.write(self._console.modes.undo() + message.encode())
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
            self.out.write(f"\r\n[{MSG}: stopping the VM]\r\n".encode())
            self._console.on_stop()
        elif key == "d":
            instance = self._console.instance
            self.detach(
                f"\r\n[{MSG}: detached; the VM keeps running. Attach with "
                f"'agentvm-supervise attach {instance}', or press Enter here.]\r\n"
            )
        elif key == "?":
            self.out.write(help_text(escape))
        else:
            self.out.write(
                f"\r\n[{MSG}: {describe_key(escape)} {key!r} means nothing; ? for help]\r\n".encode()
            )

    # -- the terminal going away

    def _output_failed(self, exc: OSError) -> None:
        """From either thread. A terminal that went away is noticed by reading stdin (or by the
        SIGHUP it sends); a closed pipe only stops the output, the VM goes on."""
        if not self._is_terminal:
            structlog.get_logger().warning(
                "stdout closed; console output no longer shown", reason=exc.strerror
            )

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
            if self.interactive:
                tg.start_soon(self._follow_resizes)
            self.attach()
            await self._read_input()
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
            await self.out.drain()

    def close(self) -> None:
        """Give the terminal back: undo the guest's modes, then the settings and file flags."""
        self.out.abandon()
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
        self.out = Sink(conn.fileno(), wake_pump=console.wake_pump, on_error=self._failed)
        self._frames = proto.FrameReader()
        self._done = anyio.Event()
        self.finished = anyio.Event()
        self._log = structlog.get_logger().bind(client_pid=pid)

    def show(self, data: bytes) -> None:
        for start in range(0, len(data), proto.MAX_PAYLOAD):
            self.out.write(proto.frame(proto.Kind.OUTPUT, data[start : start + proto.MAX_PAYLOAD]))

    def holds_back(self, now: float) -> bool:
        """As the supervisor's terminal, but an attach that takes nothing for CLIENT_STALL seconds
        (stopped with Ctrl-Z, its connection dead) must not stop the VM: it is disconnected."""
        if self.out.backlog <= BACKLOG:
            return False
        if self.out.waiting_since(now) < CLIENT_STALL:
            return True
        self._log.warning(
            "attach client took no output for a while; disconnecting it",
            backlog=self.out.backlog,
            seconds=CLIENT_STALL,
        )
        self.out.abandon()
        self._hang_up()
        return False

    def displace(self, by: str) -> None:
        self.end(f"{by} took over the console; the VM keeps running")

    def end(self, text: str) -> None:
        self.out.write(proto.message(proto.Kind.NOTICE, proto.Notice(text=text, end=True)))
        self._done.set()

    def _failed(self, exc: OSError) -> None:
        self._hang_up()

    def _hang_up(self) -> None:
        """From either thread: the receiving task sees the end of the connection and finishes."""
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._receive)
                await self._done.wait()
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    await self.out.drain()
                tg.cancel_scope.cancel()
        finally:
            self.out.abandon()  # before the connection is closed: its fd number may be reused
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
            self.out.write(proto.message(proto.Kind.WELCOME, welcome))
            self._console.attach(self, size)
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
    """Output is read, filtered and shown by an OutputPump thread; everything else (input,
    attaches, resizes) happens in the event loop. `lock` keeps the two apart: the pump holds it
    while it hands a read to the filter, the replay buffer, the log and the terminals, the event
    loop while it changes who is attached (so that an attach gets the replay and then every read
    after it, none twice and none lost)."""

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
        self.lock = threading.RLock()
        self.replay = ReplayBuffer(settings.replay_bytes)
        self.modes = TerminalModes()
        self.attached: Attachment | None = None
        self._pty = pty
        self._size = size
        self._resize_port = resize_port
        self._log = log
        # The filter parses the output as a terminal does and hands the mode switches to the
        # tracker. Switched off, it still parses (what it would pass is not used): its C fast path
        # is cheaper than the tracker's own scan.
        self._parser = OutputFilter(on_sequence=self.modes.sequence)
        self._local: _LocalTerminal | None = None
        self._passive: _LocalTerminal | None = None
        self._input = Writer(pty.master, lambda exc: None)
        self._clients: list[_SocketClient] = []
        self._connections = 0  # accepted on console.sock and not closed yet, handshakes included
        self._refused = 0
        self._sinks: tuple[Sink, ...] = ()
        self._pump = OutputPump(
            pty.master,
            on_output=self._output,
            on_end=self._end_of_output,
            sinks=lambda: self._sinks,
            paused=self._held_back,
            log=log,
            log_delay=LOG_FLUSH_DELAY,
        )
        self._logger = structlog.get_logger().bind(instance=instance)

    def wake_pump(self) -> None:
        self._pump.wake()

    async def run(self, *, stdin_fd: int, stdout_fd: int, listener: socket.socket | None = None) -> None:
        """Serve the console until the guest side of the PTY closes (QEMU exited)."""
        local = self._local = _LocalTerminal(self, stdin_fd, stdout_fd)
        if not local.interactive:
            self._passive = local
        self._sinks = (local.out,)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._input.run)
                tg.start_soon(local.run)
                if listener is not None:
                    tg.start_soon(self._serve, listener, tg)
                await self._pump.run()
                for client in self._clients:
                    client.end("the VM stopped")
                await local.flush()
                with anyio.move_on_after(DRAIN_TIMEOUT):
                    for client in list(self._clients):
                        await client.finished.wait()
                tg.cancel_scope.cancel()
        finally:
            self._pump.close()
            local.close()

    # -- output (in the pump's thread)

    def _output(self, data: bytes) -> None:
        with self.lock:
            filtered = self._parser.feed(data)
            self._publish(filtered if self.settings.filter else data)

    def _end_of_output(self) -> None:
        with self.lock:
            rest = self._parser.flush()
            if self.settings.filter:
                self._publish(rest)
        if self._log is not None:
            self._log.flush()

    def _publish(self, data: bytes) -> None:
        if not data:
            return
        self.replay.append(data)
        if self._log is not None:
            self._log.write(data)
        if self._passive is not None:
            self._passive.show(data)
        if self.attached is not None and self.attached is not self._passive:
            self.attached.show(data)

    def _held_back(self) -> bool:
        """Whether a terminal that shows the output is too far behind (see Attachment.holds_back)."""
        now = time.monotonic()
        with self.lock:
            passive, attached = self._passive, self.attached
            held = passive is not None and passive.holds_back(now)
            return (attached is not None and attached is not passive and attached.holds_back(now)) or held

    def drop_passive(self, local: _LocalTerminal) -> None:
        with self.lock:
            if self._passive is local:
                self._passive = None

    # -- attachments (in the event loop)

    def attach(self, who: Attachment, size: tuple[int, int] | None, *, since: int | None = None) -> None:
        """`who` holds the console now, and is shown the replay (from `since`, a replay offset)."""
        with self.lock:
            previous, self.attached = self.attached, who
            if previous is not None and previous is not who:
                previous.displace(who.description)
            if size is not None:
                self.resize(size)
            who.show(self.modes.before_replay() + self.replay.since(since) + self.modes.after_replay())
        self._logger.info("console attached", to=who.description)

    def detach(self, who: Attachment) -> None:
        with self.lock:
            if self.attached is not who:
                return
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
            if self._connections >= MAX_CONNECTIONS:
                conn.close()
                self._refused += 1
                if self._refused in (1, 10, 100) or self._refused % 1000 == 0:  # a flood: a few lines
                    self._logger.warning(
                        "refused console connections: too many open",
                        limit=MAX_CONNECTIONS,
                        refused=self._refused,
                    )
                continue
            self._connections += 1
            tg.start_soon(self._serve_client, conn)

    async def _serve_client(self, conn: socket.socket) -> None:
        try:
            await self._serve_connection(conn)
        finally:
            self._connections -= 1

    async def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)
            pid, uid = _peer(conn)
            if uid not in (os.geteuid(), 0):
                self._logger.warning("refused a console connection from another user", uid=uid, pid=pid)
                return
            client = _SocketClient(self, conn, pid)
            self._clients.append(client)
            self._sinks = (*self._sinks, client.out)
            try:
                await client.run()
            finally:
                self._clients.remove(client)
                self._sinks = tuple(sink for sink in self._sinks if sink is not client.out)
