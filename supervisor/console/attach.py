"""`agentvm-supervise attach [INSTANCE]`: the console of a running VM, from another terminal.

The instance is found under the runtime base dir (runtime.py): INSTANCE is its full id or a
prefix of exactly one live instance's id (e.g. the --name it was started with); with one live
instance of this user it may be left out. The client connects to INSTANCE/console.sock and takes
the console over (the terminal that held it is told, and detached). It shows the replay of the
recent output, then the live console; the escape key works as in `run` (`.` stops the VM, `d`
detaches, `?` helps). It ends when it detaches, when another attach takes over, or when the VM
stops, always with the terminal as it found it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path

import anyio

from supervisor import runtime
from supervisor.console import protocol as proto
from supervisor.console.escape import escape_reader
from supervisor.console.filter import OutputFilter
from supervisor.console.modes import TerminalModes
from supervisor.console.settings import MSG
from supervisor.console.terminal import (
    TerminalMode,
    Writer,
    get_window_size,
    read_some,
    recv_some,
    terminal_alive,
)
from supervisor.errors import ExitCode, SupervisorError


def find_console(base: Path, name: str | None) -> tuple[str, Path]:
    """(instance id, console.sock path) of the instance `name` names (runtime.find_instance)."""
    found = runtime.find_instance(base, name, verb="attach")
    return found.state.instance, found.files.console_socket


def _connect(instance: str, path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        conn.connect(os.fsencode(path))
    except OSError as exc:
        conn.close()
        raise SupervisorError(
            f"cannot connect to the console of {instance} at {path} ({exc.strerror}): the VM may just "
            "have stopped; see 'agentvm-supervise attach' without a name for the running ones",
            exit_code=ExitCode.UNAVAILABLE,
        ) from None
    conn.setblocking(False)
    return conn


async def attach(instance: str, path: Path, *, stdin: int, stdout: int, escape: int | None) -> int:
    """Attach this process's terminal to the console at `path` until detached or the VM stops."""
    client = _Client(instance, _connect(instance, path), stdin=stdin, stdout=stdout, escape=escape)
    return await client.run()


class _Client:
    """One attach: the connection, the user's terminal, and why it ends (the first reason wins)."""

    def __init__(
        self, instance: str, conn: socket.socket, *, stdin: int, stdout: int, escape: int | None
    ) -> None:
        self.instance = instance
        self.conn = conn
        self.stdin = stdin
        self.stdout = stdout
        self.interactive = os.isatty(stdin)
        self.mode = TerminalMode(stdin) if self.interactive else None
        self.stdout_flags = os.get_blocking(stdout)
        self.modes = TerminalModes()
        # The output was filtered by the supervisor; parsing it again only follows the modes it
        # turns on (what it would pass is not used): the filter's C fast path beats the tracker's scan.
        self.parser = OutputFilter(on_sequence=self.modes.sequence)
        self.ended = anyio.Event()
        self.message = ""
        self.status = 0
        self.to_server = Writer(
            conn.fileno(), lambda exc: self.finish(f"the console connection broke ({exc.strerror})", 1)
        )
        self.to_terminal = Writer(stdout, lambda exc: self.finish("", 1))
        self.escapes = escape_reader(
            escape if self.interactive else None,
            stop=lambda: self.to_server.write(proto.frame(proto.Kind.STOP)),
            detach=lambda: self.finish(f"detached from {instance}; the VM keeps running"),
            show=self.to_terminal.write,
        )

    def finish(self, message: str, status: int = 0) -> None:
        if not self.ended.is_set():
            self.message, self.status = message, status
            self.ended.set()

    async def run(self) -> int:
        size = get_window_size(self.stdin) if self.interactive else None
        hello = proto.Hello(
            version=proto.VERSION,
            pid=os.getpid(),
            rows=size[0] if size else None,
            cols=size[1] if size else None,
        )
        try:
            os.set_blocking(self.stdout, False)
            if self.mode is not None:
                self.mode.enter_raw()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.to_server.run)
                tg.start_soon(self.to_terminal.run)
                tg.start_soon(self._from_server)
                tg.start_soon(self._from_user)
                tg.start_soon(self._on_signals)
                if self.interactive:
                    tg.start_soon(self._follow_resizes)
                self.to_server.write(proto.message(proto.Kind.HELLO, hello))
                await self.ended.wait()
                with anyio.move_on_after(1.0):
                    await self.to_terminal.wait_below(0)
                tg.cancel_scope.cancel()
        finally:
            self._give_back_the_terminal()
        if self.message:
            with contextlib.suppress(OSError):
                os.write(self.stdout, f"\r\n[{MSG}: {self.message}]\r\n".encode())
        return self.status

    def _give_back_the_terminal(self) -> None:
        self.conn.close()
        with contextlib.suppress(OSError):
            os.set_blocking(self.stdout, True)
            os.write(self.stdout, self.modes.undo())
        if self.mode is not None:
            self.mode.close()
        with contextlib.suppress(OSError):
            os.set_blocking(self.stdout, self.stdout_flags)

    async def _from_server(self) -> None:
        frames = proto.FrameReader()
        while True:
            try:
                data = await recv_some(self.conn)
            except OSError as exc:
                self.finish(f"the console connection broke ({exc.strerror})", 1)
                return
            if not data:
                self.finish(f"the console of {self.instance} closed (the VM stopped)")
                return
            try:
                for kind, payload in frames.feed(data):
                    if not self._handle(kind, payload):
                        return
            except proto.ProtocolError as exc:
                self.finish(f"the supervisor sent something this attach does not understand ({exc})", 1)
                return

    def _handle(self, kind: proto.Kind, payload: bytes) -> bool:
        """One frame from the supervisor; False when it ends the attach."""
        if kind is proto.Kind.OUTPUT:
            self.parser.feed(payload)
            self.to_terminal.write(payload)
        elif kind is proto.Kind.NOTICE:
            notice = proto.decode(payload, proto.Notice)
            if notice.end:
                self.finish(notice.text)
                return False
            self.to_terminal.write(f"\r\n[{MSG}: {notice.text}]\r\n".encode())
        return True

    async def _from_user(self) -> None:
        while True:
            try:
                data = await read_some(self.stdin)
            except OSError:
                data = b""
            if not data:
                if self.interactive and not terminal_alive(self.stdin):
                    self.finish("", 1)
                return  # stdin at its end: keep showing the console
            data = self.escapes.feed(data)
            if data:
                self.to_server.write(proto.frame(proto.Kind.INPUT, data))

    async def _follow_resizes(self) -> None:
        with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                size = get_window_size(self.stdin)
                if size is not None:
                    self.to_server.write(
                        proto.message(proto.Kind.RESIZE, proto.Size(rows=size[0], cols=size[1]))
                    )

    async def _on_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
            async for signum in signals:
                self.finish(f"detached on {signal.Signals(signum).name}; the VM keeps running", 128 + signum)
