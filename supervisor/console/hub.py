"""The console hub: the PTY master fanned out to one attached terminal, replay and log.

    guest hvc0 - QEMU stdio = PTY slave | master - Console -+- the supervisor's own terminal
                                                            +- console.sock <- `agentvm-supervise attach`
                                                            +- replay buffer, console log
                                                            +- resize port -> the guest's stty

Output is read from the master, passed through the hostile-output filter (filter), kept in
the replay buffer and the log (log), and written to the attached terminal, all by a thread
of its own (output: a copy loop costs far less per read than a round of the event loop). Input,
attaches and resizes are event-loop tasks. Input comes from the attached terminal only, with the
escape key taken out. One terminal is attached at a time and
the newest attach takes over: the one it displaces is told so and detached, and gets the console
back the same way. The supervisor's own terminal is attached at start; it is in raw mode only while
attached and gets its settings (and the modes the guest switched on, see modes) back when it
detaches and on every way out. When stdin is not a terminal there is no raw mode and no escape key:
output still goes to stdout (always, even while an attach holds the console), and input is
forwarded while no attach holds it.

Sizes go to the PTY and, as "ROWS COLS" lines, to the guest over the virtio-serial port
org.agentvm.resize, where a helper applies them to hvc0 (guest/init.sh, nix/guest-resize.nix):
virtconsole itself does not carry the size (microvm.nix#123).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import anyio
import anyio.abc
import anyio.to_thread
import structlog

from supervisor.console import protocol as proto
from supervisor.console.escape import escape_reader
from supervisor.console.filter import OutputFilter
from supervisor.console.log import ConsoleLog, ReplayBuffer
from supervisor.console.modes import TerminalModes
from supervisor.console.output import OutputPump, Sink
from supervisor.console.settings import MSG, ConsoleSettings
from supervisor.console.terminal import (
    ConsolePty,
    TerminalMode,
    Writer,
    get_window_size,
    read_some,
    recv_some,
    set_window_size,
    terminal_alive,
)
from supervisor.peer import peer_of

BACKLOG = 256 << 10  # output waiting for the terminal that shows it before the guest is slowed down
CLIENT_STALL = 10.0  # seconds an attach client may take nothing, its backlog full, before it goes
INPUT_BACKLOG = 1 << 20  # input waiting for a guest that does not read before it is dropped
HELLO_TIMEOUT = 10.0
# Connections console.sock holds at once (as control.MAX_CONNECTIONS): a flood of them held the
# supervisor at its fd limit. A client past the cap is closed at once.
MAX_CONNECTIONS = 16
DRAIN_TIMEOUT = 1.0
LOG_FLUSH_DELAY = 0.2


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
        self._escapes = escape_reader(
            escape, stop=console.on_stop, detach=self._detach_by_key, show=self.out.write
        )
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

    def _detach_by_key(self) -> None:
        instance = self._console.instance
        self.detach(
            f"\r\n[{MSG}: detached; the VM keeps running. Attach with "
            f"'agentvm-supervise attach {instance}', or press Enter here.]\r\n"
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
            data = await recv_some(self._conn)
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
            peer = peer_of(conn)
            if not peer.allowed:
                self._logger.warning(
                    "refused a console connection from another user", uid=peer.uid, pid=peer.pid
                )
                return
            client = _SocketClient(self, conn, peer.pid)
            self._clients.append(client)
            self._sinks = (*self._sinks, client.out)
            try:
                await client.run()
            finally:
                self._clients.remove(client)
                self._sinks = tuple(sink for sink in self._sinks if sink is not client.out)
