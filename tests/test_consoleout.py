"""The console's output thread and its sinks: order, backpressure, the log, stopping."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import select
import socket
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor.console import hub as console_module
from supervisor.console import protocol as proto
from supervisor.console.hub import BACKLOG, LOG_FLUSH_DELAY, Console, bind_console_socket
from supervisor.console.log import open_log
from supervisor.console.output import Sink
from supervisor.console.settings import ConsoleSettings
from supervisor.console.terminal import ConsolePty, open_console_pty

pytestmark = pytest.mark.anyio


@pytest.fixture
def guest() -> Iterator[ConsolePty]:
    pty = open_console_pty((24, 80))
    tty.setraw(pty.slave)  # as QEMU makes it
    yield pty
    pty.close()


def _pipe(capacity: int = 4096) -> tuple[int, int]:
    read_end, write_end = os.pipe()

    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, capacity)
    os.set_blocking(write_end, False)
    return read_end, write_end


def _numbered(count: int, tag: bytes) -> list[bytes]:
    return [b"%s%06d|" % (tag, index) for index in range(count)]


def test_writes_from_two_threads_arrive_whole_and_each_in_its_order() -> None:
    read_end, write_end = _pipe()
    errors: list[OSError] = []
    sink = Sink(write_end, wake_pump=lambda: None, on_error=errors.append)
    got = bytearray()

    def reader() -> None:
        while chunk := os.read(read_end, 65536):
            got.extend(chunk)

    drain = threading.Thread(target=reader)
    drain.start()
    pieces = {tag: _numbered(3000, tag) for tag in (b"a", b"b")}

    def writer(tag: bytes) -> None:
        for piece in pieces[tag]:
            sink.write(piece)
            sink.flush()  # both threads also write out the queue, as the pump and drain() do

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in pieces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    while sink.backlog:
        sink.flush()
    os.close(write_end)
    drain.join()
    os.close(read_end)
    assert not errors
    text = bytes(got).split(b"|")[:-1]
    for tag, expected in pieces.items():
        assert [piece + b"|" for piece in text if piece.startswith(tag)] == expected


def test_a_failed_sink_reports_once_and_drops_the_rest() -> None:
    read_end, write_end = _pipe()
    errors: list[OSError] = []
    sink = Sink(write_end, wake_pump=lambda: None, on_error=errors.append)
    sink.write(b"x" * 100_000)  # most of it queued
    os.close(read_end)
    sink.flush()
    sink.write(b"more")
    sink.flush()
    assert [exc.errno for exc in errors] == [32]  # EPIPE, reported once
    assert sink.failed and sink.backlog == 0
    os.close(write_end)


async def test_a_terminal_that_does_not_read_slows_the_guest_and_loses_nothing(guest: ConsolePty) -> None:
    stdout_read, stdout_write = _pipe()
    console = Console(
        guest, instance="slow-0001", settings=ConsoleSettings(), size=None, on_stop=lambda: None
    )
    payload = b"".join(_numbered(200_000, b"line"))  # 2.2 MiB, far more than the backlog allows
    os.set_blocking(guest.slave, False)
    with Path(os.devnull).open("rb") as devnull:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(console.run, stdin_fd=devnull.fileno(), stdout_fd=stdout_write))
            view = memoryview(payload)
            with anyio.fail_after(20):  # the guest writes until the console stops reading
                while view:
                    try:
                        view = view[os.write(guest.slave, view) :]
                        continue
                    except BlockingIOError:
                        pass
                    with anyio.move_on_after(0.5) as quiet:  # a blocked guest stays blocked
                        await anyio.wait_writable(guest.slave)
                    if quiet.cancelled_caught:
                        break
            taken = len(payload) - len(view)
            assert taken < len(payload)
            assert taken <= BACKLOG + (256 << 10)  # the backlog, plus PTY and pipe buffers
            got = bytearray()
            os.set_blocking(stdout_read, False)
            with anyio.fail_after(30):
                while len(got) < len(payload):
                    if view:
                        with contextlib.suppress(BlockingIOError):
                            view = view[os.write(guest.slave, view) :]
                    await anyio.wait_readable(stdout_read)
                    with contextlib.suppress(BlockingIOError):
                        got += os.read(stdout_read, 65536)
            guest.close_slave()
    assert bytes(got) == payload
    os.close(stdout_read)
    os.close(stdout_write)


async def test_the_log_catches_up_when_the_guest_pauses(guest: ConsolePty, tmp_path: Path) -> None:
    settings = ConsoleSettings(log_dir=tmp_path)
    log = open_log(tmp_path, "log-0001", max_bytes=settings.log_max_bytes, keep=2)
    console = Console(guest, instance="log-0001", settings=settings, size=None, on_stop=lambda: None, log=log)
    stdout_read, stdout_write = os.pipe()
    with Path(os.devnull).open("rb") as devnull:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(console.run, stdin_fd=devnull.fileno(), stdout_fd=stdout_write))
            os.write(guest.slave, b"a few bytes\r\n")
            with anyio.fail_after(5):
                while log.path.read_bytes() != b"a few bytes\r\n":
                    await anyio.sleep(LOG_FLUSH_DELAY / 4)
            guest.close_slave()
    log.close()
    os.close(stdout_read)
    os.close(stdout_write)


async def test_a_cancelled_console_stops_its_output_thread_before_it_returns(guest: ConsolePty) -> None:
    stdout_read, stdout_write = _pipe()
    console = Console(
        guest, instance="stop-0001", settings=ConsoleSettings(), size=None, on_stop=lambda: None
    )
    os.set_blocking(guest.slave, False)
    with Path(os.devnull).open("rb") as devnull:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(console.run, stdin_fd=devnull.fileno(), stdout_fd=stdout_write))
            with contextlib.suppress(BlockingIOError):
                os.write(guest.slave, b"x" * 65536)  # the pump is busy, or waits for the pipe
            await anyio.sleep(0.2)
            assert console._pump.running
            tg.cancel_scope.cancel()
    assert not console._pump.running
    os.close(stdout_read)
    os.close(stdout_write)


async def test_keys_reach_the_guest_and_the_escape_key_works_while_the_guest_floods_the_screen(
    guest: ConsolePty,
) -> None:
    """The output thread must leave the event loop (input, the escape key) its turn: a guest that
    prints without pause (`yes`, a runaway log) is when the user needs Ctrl-C and Ctrl-] most."""
    user_master, user_slave = os.openpty()
    stops: list[str] = []
    console = Console(
        guest, instance="flood-0001", settings=ConsoleSettings(), size=None,
        on_stop=lambda: stops.append("stop"),
    )  # fmt: skip
    flooding = threading.Event()
    flooding.set()
    shown = bytearray()

    def guest_floods() -> None:
        line = b"\x1b[32my\x1b[0m" * 400 + b"\r\n"
        os.set_blocking(guest.slave, False)
        with contextlib.suppress(OSError):
            while flooding.is_set():  # as fast as the console takes it
                if select.select([], [guest.slave], [], 0.1)[1]:
                    with contextlib.suppress(BlockingIOError):
                        os.write(guest.slave, line)

    def terminal_shows() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(user_master, 65536):
                shown.extend(chunk)

    threads = [threading.Thread(target=guest_floods), threading.Thread(target=terminal_shows)]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(console.run, stdin_fd=user_slave, stdout_fd=user_slave))
            for thread in threads:
                thread.start()
            with anyio.fail_after(10):
                while len(shown) < 1 << 20:
                    await anyio.sleep(0.05)
            os.write(user_master, b"typed\x03")  # a word and Ctrl-C, mid-flood
            typed = bytearray()
            with anyio.fail_after(10):
                while not typed.endswith(b"typed\x03"):
                    await anyio.wait_readable(guest.slave)
                    with contextlib.suppress(BlockingIOError):
                        typed += os.read(guest.slave, 64)
            os.write(user_master, b"\x1d.")  # Ctrl-] .
            with anyio.fail_after(10):
                while not stops:
                    await anyio.sleep(0.02)
            flooding.clear()
            tg.cancel_scope.cancel()
    finally:
        flooding.clear()
        os.close(user_slave)  # the terminal's reader now gets EIO
        for thread in threads:
            thread.join(10)
        os.close(user_master)
    assert stops == ["stop"]
    assert b"stopping the VM" in shown


def _hello(conn: socket.socket) -> None:
    conn.sendall(proto.message(proto.Kind.HELLO, proto.Hello(version=proto.VERSION, pid=os.getpid())))


async def _guest_writes(guest: ConsolePty, data: bytes, timeout: float) -> int:
    """Write `data` as the guest, for at most `timeout` seconds; how much the console took."""
    os.set_blocking(guest.slave, False)
    view = memoryview(data)
    with anyio.move_on_after(timeout):
        while view:
            try:
                view = view[os.write(guest.slave, view) :]
            except BlockingIOError:
                await anyio.wait_writable(guest.slave)
    return len(data) - len(view)


async def test_an_attach_that_reads_slowly_slows_the_guest_and_gets_every_byte(
    guest: ConsolePty, tmp_path: Path
) -> None:
    """The console does not drop an attach for being slow (`cat` of a big file): it waits for it."""
    path = tmp_path / "console.sock"
    listener = bind_console_socket(path)
    console = Console(
        guest, instance="slow-0002", settings=ConsoleSettings(), size=None, on_stop=lambda: None
    )
    payload = b"".join(_numbered(400_000, b"row"))  # 4.4 MiB
    received = bytearray()
    reading = threading.Event()

    def client() -> None:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(str(path))
            _hello(conn)
            frames = proto.FrameReader()
            reading.wait(30)
            while len(received) < len(payload) and (data := conn.recv(16384)):
                for kind, body in frames.feed(data):
                    if kind is proto.Kind.OUTPUT:
                        received.extend(body)
                time.sleep(0.001)  # a slow terminal

    thread = threading.Thread(target=client)
    with Path(os.devnull).open("rb") as devnull, Path(os.devnull).open("wb") as null_out:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    console.run, stdin_fd=devnull.fileno(), stdout_fd=null_out.fileno(), listener=listener
                )
            )
            thread.start()
            with anyio.fail_after(10):
                while console.attached is None:
                    await anyio.sleep(0.02)
            taken = await _guest_writes(guest, payload, 1.0)  # the client reads nothing yet
            assert taken <= BACKLOG + (1 << 20)  # the backlog, plus PTY and socket buffers
            reading.set()
            assert await _guest_writes(guest, payload[taken:], 60) == len(payload) - taken
            await anyio.to_thread.run_sync(thread.join, 30)
            guest.close_slave()
    listener.close()
    assert bytes(received) == payload


async def test_an_attach_that_takes_nothing_is_disconnected_and_the_vm_goes_on(
    guest: ConsolePty, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_module, "CLIENT_STALL", 0.5)
    path = tmp_path / "console.sock"
    listener = bind_console_socket(path)
    console = Console(
        guest, instance="stuck-0001", settings=ConsoleSettings(), size=None, on_stop=lambda: None
    )
    payload = b"y" * (4 << 20)
    with (
        Path(os.devnull).open("rb") as devnull,
        Path(os.devnull).open("wb") as null_out,
        socket.socket(socket.AF_UNIX) as conn,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    console.run, stdin_fd=devnull.fileno(), stdout_fd=null_out.fileno(), listener=listener
                )
            )
            conn.connect(str(path))
            _hello(conn)  # and then takes nothing, as a stopped `attach` would
            with anyio.fail_after(10):
                while console.attached is None:
                    await anyio.sleep(0.02)
            assert await _guest_writes(guest, payload, 20) == len(payload)
            assert console.attached is None
            conn.settimeout(10)
            while conn.recv(1 << 20):  # what was queued, then the end
                pass
            guest.close_slave()
    listener.close()
