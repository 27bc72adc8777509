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

from supervisor import consoleproto as proto
from supervisor import runtime, trust
from supervisor.console import (
    MSG,
    EscapeReader,
    TerminalMode,
    Writer,
    describe_key,
    get_window_size,
    help_text,
    read_some,
    terminal_alive,
)
from supervisor.errors import ExitCode, SupervisorError
from supervisor.termfilter import OutputFilter
from supervisor.termmodes import TerminalModes

CONSOLE_SOCKET = "console.sock"


def live_instances(base: Path) -> list[str]:
    """Ids of the instances under `base` whose supervisor is alive and serves a console."""
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        state = runtime.read_state(entry) if trust.instance_trusted(entry) else None
        if state is not None and not runtime.is_stale(state) and (entry / CONSOLE_SOCKET).exists():
            found.append(state.instance)
    return found


def find_console(base: Path, name: str | None) -> tuple[str, Path]:
    """(instance id, console.sock path) of the instance `name` names, or a SupervisorError."""
    trust.check_base(base)
    live = live_instances(base)
    if not live:
        raise SupervisorError(
            f"no running agentvm instance of this user under {base}: start one with "
            "'agentvm-supervise run', or pass the --runtime-dir it was started with",
            exit_code=ExitCode.NO_INPUT,
        )
    if name is None:
        if len(live) > 1:
            raise SupervisorError(
                f"{len(live)} instances are running ({', '.join(live)}): name one, as in "
                f"'agentvm-supervise attach {live[0]}'",
            )
        matches = live
    else:
        matches = [instance for instance in live if instance == name] or [
            instance for instance in live if instance.startswith(name)
        ]
    if not matches:
        raise SupervisorError(
            f"no running instance is called '{name}' under {base}; running: {', '.join(live)}",
            exit_code=ExitCode.NO_INPUT,
        )
    if len(matches) > 1:
        raise SupervisorError(
            f"'{name}' matches {len(matches)} instances ({', '.join(matches)}): give more of the id",
        )
    return matches[0], base / matches[0] / CONSOLE_SOCKET


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

    def command(key: str) -> None:
        assert escape is not None
        if key == ".":
            to_terminal.write(f"\r\n[{MSG}: stopping the VM]\r\n".encode())
            to_server.write(proto.frame(proto.Kind.STOP))
        elif key == "d":
            finish(f"detached from {instance}; the VM keeps running")
        elif key == "?":
            to_terminal.write(help_text(escape))
        else:
            to_terminal.write(
                f"\r\n[{MSG}: {describe_key(escape)} {key!r} means nothing; ? for help]\r\n".encode()
            )

    escapes = EscapeReader(escape if interactive else None, command)

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
