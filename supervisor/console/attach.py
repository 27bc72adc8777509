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
from dataclasses import dataclass
from pathlib import Path

import anyio

from supervisor import runtime
from supervisor.console import protocol as proto
from supervisor.console.escape import escape_reader
from supervisor.console.filter import OutputFilter
from supervisor.console.modes import TerminalModes
from supervisor.console.settings import MSG
from supervisor.console.terminal import TerminalMode, Writer, get_window_size, read_some, terminal_alive
from supervisor.errors import ExitCode, SupervisorError


def find_console(base: Path, name: str | None) -> tuple[str, Path]:
    """(instance id, console.sock path) of the instance `name` names (runtime.find_instance)."""
    found = runtime.find_instance(base, name, verb="attach")
    return found.state.instance, found.files.console_socket


@dataclass
class _Session:
    """The client's state: why it ends, and how the terminal must be given back."""

    instance: str
    ended: anyio.Event
    message: str = ""
    status: int = 0


async def attach(instance: str, path: Path, *, stdin: int, stdout: int, escape: int | None) -> int:
    """Attach this process's terminal to the console at `path` until detached or the VM stops."""
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
    interactive = os.isatty(stdin)
    mode = TerminalMode(stdin) if interactive else None
    stdout_flags = os.get_blocking(stdout)
    modes = TerminalModes()
    # The output was filtered by the supervisor; parsing it again only follows the modes it turns
    # on (what it would pass is not used): the filter's C fast path beats the tracker's own scan.
    parser = OutputFilter(on_sequence=modes.sequence)
    session = _Session(instance, anyio.Event())

    def finish(message: str, status: int = 0) -> None:
        if not session.ended.is_set():
            session.message, session.status = message, status
            session.ended.set()

    to_server = Writer(conn.fileno(), lambda exc: finish(f"the console connection broke ({exc.strerror})", 1))
    to_terminal = Writer(stdout, lambda exc: finish("", 1))

    def show(data: bytes) -> None:
        parser.feed(data)
        to_terminal.write(data)

    def stop() -> None:
        to_server.write(proto.frame(proto.Kind.STOP))

    def detach() -> None:
        finish(f"detached from {instance}; the VM keeps running")

    escapes = escape_reader(escape if interactive else None, stop=stop, detach=detach, show=to_terminal.write)

    async def from_server() -> None:
        frames = proto.FrameReader()
        while True:
            try:
                data = conn.recv(65536)
            except BlockingIOError:
                await anyio.wait_readable(conn)
                continue
            except OSError as exc:
                finish(f"the console connection broke ({exc.strerror})", 1)
                return
            if not data:
                finish(f"the console of {instance} closed (the VM stopped)")
                return
            try:
                for kind, payload in frames.feed(data):
                    if kind is proto.Kind.OUTPUT:
                        show(payload)
                    elif kind is proto.Kind.NOTICE:
                        notice = proto.decode(payload, proto.Notice)
                        if notice.end:
                            finish(notice.text)
                            return
                        to_terminal.write(f"\r\n[{MSG}: {notice.text}]\r\n".encode())
            except proto.ProtocolError as exc:
                finish(f"the supervisor sent something this attach does not understand ({exc})", 1)
                return

    async def from_user() -> None:
        while True:
            try:
                data = await read_some(stdin)
            except OSError:
                data = b""
            if not data:
                if interactive and not terminal_alive(stdin):
                    finish("", 1)
                return  # stdin at its end: keep showing the console
            data = escapes.feed(data)
            if data:
                to_server.write(proto.frame(proto.Kind.INPUT, data))

    async def follow_resizes() -> None:
        with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
            async for _ in signals:
                size = get_window_size(stdin)
                if size is not None:
                    to_server.write(proto.message(proto.Kind.RESIZE, proto.Size(rows=size[0], cols=size[1])))

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
            async for signum in signals:
                finish(f"detached on {signal.Signals(signum).name}; the VM keeps running", 128 + signum)

    size = get_window_size(stdin) if interactive else None
    hello = proto.Hello(
        version=proto.VERSION, pid=os.getpid(), rows=size[0] if size else None, cols=size[1] if size else None
    )
    try:
        os.set_blocking(stdout, False)
        if mode is not None:
            mode.enter_raw()
        async with anyio.create_task_group() as tg:
            tg.start_soon(to_server.run)
            tg.start_soon(to_terminal.run)
            tg.start_soon(from_server)
            tg.start_soon(from_user)
            tg.start_soon(on_signals)
            if interactive:
                tg.start_soon(follow_resizes)
            to_server.write(proto.message(proto.Kind.HELLO, hello))
            await session.ended.wait()
            with anyio.move_on_after(1.0):
                await to_terminal.wait_below(0)
            tg.cancel_scope.cancel()
    finally:
        conn.close()
        with contextlib.suppress(OSError):
            os.set_blocking(stdout, True)
            os.write(stdout, modes.undo())
        if mode is not None:
            mode.close()
        with contextlib.suppress(OSError):
            os.set_blocking(stdout, stdout_flags)
    if session.message:
        with contextlib.suppress(OSError):
            os.write(stdout, f"\r\n[{MSG}: {session.message}]\r\n".encode())
    return session.status
