"""The console without a VM: real PTYs play the guest, the supervisor's terminal and an attach
client's terminal; `agentvm-supervise attach` runs as a real process on its own terminal."""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import subprocess
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog.testing

from supervisor import runtime
from supervisor.children import read_start_ticks
from supervisor.console import attach
from supervisor.console.escape import EscapeReader
from supervisor.console.filter import SafeRunEnd
from supervisor.console.hub import Console, bind_console_socket
from supervisor.console.log import ReplayBuffer, open_log
from supervisor.console.modes import TerminalModes
from supervisor.console.settings import ConsoleSettings, parse_escape_key
from supervisor.console.terminal import ConsolePty, get_window_size, open_console_pty, set_window_size
from supervisor.errors import SupervisorError
from supervisor.qemu import QemuSpec, qemu_argv
from tests.support import base_env, run_supervisor, supervisor_argv

pytestmark = pytest.mark.anyio


class Screen:
    """What a PTY master received, read as it comes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.data = bytearray()
        self._mark = 0

    async def wait_for(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """Everything since the last wait_for up to and including `marker`."""
        with anyio.fail_after(timeout):
            while marker not in self.data[self._mark :]:
                await anyio.wait_readable(self.fd)
                try:
                    self.data += os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    raise AssertionError(
                        f"{marker!r} never came; got {bytes(self.data[self._mark :])!r}"
                    ) from None
        end = self.data.index(marker, self._mark) + len(marker)
        seen, self._mark = bytes(self.data[self._mark : end]), end
        return seen

    def drain(self) -> bytes:
        """Read what is there now; return everything not yet returned by wait_for."""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self.data += chunk
        return bytes(self.data[self._mark :])


@pytest.fixture
def guest() -> Iterator[ConsolePty]:
    pty = open_console_pty((24, 80))
    tty.setraw(pty.slave)  # as QEMU makes it
    os.set_blocking(pty.slave, False)
    yield pty
    pty.close()


async def _guest_reads(pty: ConsolePty, marker: bytes, timeout: float = 20.0) -> bytes:
    got = bytearray()
    with anyio.fail_after(timeout):
        while marker not in got:
            await anyio.wait_readable(pty.slave)
            got += os.read(pty.slave, 4096)
    return bytes(got)


def _live_instance(base: Path, name: str) -> Path:
    """An instance dir that attach recognizes as live: its state names this (live) process."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = runtime.create_instance_dir(base, name)
    state = runtime.InstanceState(
        instance=name,
        supervisor_pid=os.getpid(),
        supervisor_start_ticks=read_start_ticks(os.getpid()),
        created=0,
    )
    runtime.write_state(path, state)
    return path


def _controlling_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _start_attach(base: Path, terminal: int, *args: str) -> subprocess.Popen[bytes]:
    """`agentvm-supervise attach` in its own session, with `terminal` as its controlling tty."""
    return subprocess.Popen(
        [*supervisor_argv(), "attach", "--runtime-dir", str(base), *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
        preexec_fn=_controlling_terminal,  # noqa: PLW1509 - a test; the child needs its tty for SIGWINCH
        env=base_env(),
    )


async def test_attach_takes_over_replays_resizes_and_gives_the_console_back(
    guest: ConsolePty, tmp_path: Path
) -> None:
    base = tmp_path / "rt"
    instance_dir = _live_instance(base, "box-0001")
    listener = bind_console_socket(instance_dir / "console.sock")
    assert (instance_dir / "console.sock").stat().st_mode & 0o777 == 0o600
    user_master, user_slave = os.openpty()
    set_window_size(user_slave, (30, 100))
    user_settings = termios.tcgetattr(user_slave)
    user = Screen(user_master)
    resize_ours, resize_guest = socket.socketpair()
    resize_ours.setblocking(False)
    stops: list[str] = []
    console = Console(
        guest,
        instance="box-0001",
        settings=ConsoleSettings(),
        size=(24, 80),
        on_stop=lambda: stops.append("stop"),
        resize_port=resize_ours,
    )
    client_master, client_slave = os.openpty()
    set_window_size(client_slave, (40, 120))
    client = Screen(client_master)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(console.run, stdin_fd=user_slave, stdout_fd=user_slave, listener=listener)
            )
            # The supervisor's terminal holds the console at start, raw, and its size reaches the guest.
            os.write(guest.slave, b"first line\r\n\x1b[?2004h")
            await user.wait_for(b"first line")
            assert not termios.tcgetattr(user_slave)[3] & termios.ICANON
            assert get_window_size(guest.slave) == (30, 100)
            assert resize_guest.recv(100) == b"30 100\n"
            os.write(user_master, b"typed here\r")
            assert b"typed here\r" in await _guest_reads(guest, b"\r")

            # An attach takes over: the supervisor's terminal is told and gets its modes undone and
            # its settings back; the client gets the replay, the guest's modes and its own size.
            proc = _start_attach(base, client_slave)
            seen = await client.wait_for(b"first line")
            await client.wait_for(b"\x1b[?2004h")  # bracketed paste, as the guest turned it on
            assert b"\x1b[?2004l" in await user.wait_for(b"took over the console")
            assert termios.tcgetattr(user_slave) == user_settings
            assert b"\x1b" not in seen.split(b"first line")[0]  # the replay starts clean
            with anyio.fail_after(10):
                while get_window_size(guest.slave) != (40, 120):
                    await anyio.sleep(0.02)
            assert resize_guest.recv(100) == b"40 120\n"

            # It types, it resizes, the guest's output reaches it and not the detached terminal.
            os.write(client_master, b"from the client\r")
            assert b"from the client\r" in await _guest_reads(guest, b"\r")
            set_window_size(client_master, (50, 150))  # SIGWINCH to the attach process
            with anyio.fail_after(10):
                while get_window_size(guest.slave) != (50, 150):
                    await anyio.sleep(0.02)
            os.write(guest.slave, b"while away\r\n")
            await client.wait_for(b"while away")

            # Ctrl-] d detaches the client, which exits 0 and leaves the VM running.
            os.write(client_master, b"\x1dd")
            await client.wait_for(b"detached from box-0001")
            assert await anyio.to_thread.run_sync(proc.wait, 20) == 0
            assert console.attached is None

            # Enter on the supervisor's terminal takes the console back, with what it missed.
            os.write(user_master, b"\r")
            assert b"while away" in await user.wait_for(b"while away")
            assert get_window_size(guest.slave) == (30, 100)
            os.write(user_master, b"\x1d?")
            await user.wait_for(b"this help")
            os.write(user_master, b"\x1d.")
            await user.wait_for(b"stopping the VM")
            assert stops == ["stop"]
            guest.close_slave()  # QEMU exits: the console ends
    finally:
        listener.close()
        resize_ours.close()
        resize_guest.close()
    assert user.drain().endswith(b"\x1b[?2004l\x1b[0m")  # the mode the guest left on is undone at the end
    assert termios.tcgetattr(user_slave) == user_settings
    os.close(user_slave)
    os.close(user_master)
    os.close(client_slave)
    os.close(client_master)


async def test_without_a_terminal_output_flows_filtered_and_input_is_forwarded(guest: ConsolePty) -> None:
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    console = Console(
        guest, instance="pipe-0001", settings=ConsoleSettings(), size=None, on_stop=lambda: None
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(console.run, stdin_fd=stdin_read, stdout_fd=stdout_write))
        os.write(guest.slave, b"safe \x1b]52;c;cm0gLXJmIH4K\x07text \x1b[1mbold\x1b[0m\r\n")
        os.write(stdin_write, b"echo piped\n")
        assert await _guest_reads(guest, b"\n") == b"echo piped\n"
        os.close(stdin_write)  # stdin ends; output goes on
        os.write(guest.slave, b"more\r\n")
        guest.close_slave()
    os.close(stdout_write)
    with os.fdopen(stdout_read, "rb") as out:
        assert out.read() == b"safe text \x1b[1mbold\x1b[0m\r\nmore\r\n"
    os.close(stdin_read)


async def test_the_filter_can_be_switched_off(guest: ConsolePty) -> None:
    stdout_read, stdout_write = os.pipe()
    console = Console(
        guest, instance="raw-0001", settings=ConsoleSettings(filter=False), size=None, on_stop=lambda: None
    )
    raw = b"\x1b]52;c;eA==\x07\x1b[?1049h\x1bP+q\x1b[?1000h\x1b\\"
    with Path(os.devnull).open("rb") as devnull:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(console.run, stdin_fd=devnull.fileno(), stdout_fd=stdout_write))
            os.write(guest.slave, raw)
            guest.close_slave()
    os.close(stdout_write)
    with os.fdopen(stdout_read, "rb") as out:
        assert out.read() == raw
    # The modes are still followed (an ESC ends the DCS string, as in the terminal).
    expected = TerminalModes()
    expected.sequence(b"\x1b[?1049h")
    expected.sequence(b"\x1b[?1000h")
    assert console.modes.undo() == expected.undo() != b""


async def test_a_hung_up_terminal_stops_the_vm_once_and_crashes_nothing(guest: ConsolePty) -> None:
    user_master, user_slave = os.openpty()
    hangups: list[str] = []
    console = Console(
        guest, instance="hup-0001", settings=ConsoleSettings(), size=None, on_stop=lambda: None,
        on_hangup=lambda: hangups.append("hangup"),
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(console.run, stdin_fd=user_slave, stdout_fd=user_slave))
        os.write(guest.slave, b"before\r\n")
        await anyio.sleep(0.2)
        os.close(user_master)  # the pane closes: reads and writes on the slave now fail with EIO
        with anyio.fail_after(10):
            while not hangups:
                await anyio.sleep(0.02)
        os.write(guest.slave, b"after the hangup\r\n" * 1000)  # goes nowhere, and breaks nothing
        await anyio.sleep(0.2)
        guest.close_slave()
    assert hangups == ["hangup"]
    os.close(user_slave)


async def test_garbage_on_the_console_socket_is_refused_and_the_console_goes_on(
    guest: ConsolePty, tmp_path: Path
) -> None:
    instance_dir = _live_instance(tmp_path / "rt", "junk-0001")
    path = instance_dir / "console.sock"
    listener = bind_console_socket(path)
    stdout_read, stdout_write = os.pipe()
    console = Console(
        guest, instance="junk-0001", settings=ConsoleSettings(), size=None, on_stop=lambda: None
    )
    with Path(os.devnull).open("rb") as devnull:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    console.run, stdin_fd=devnull.fileno(), stdout_fd=stdout_write, listener=listener
                )
            )
            for junk in (b"\xff" * 64, b"H\xff\xff\xff\xffxx", b"H\x00\x00\x00\x02{}"):
                stream = await anyio.connect_unix(path)
                await stream.send(junk)
                with anyio.fail_after(10):
                    try:
                        while await stream.receive():
                            pass
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        pass  # the server closed it
                await stream.aclose()
            os.write(guest.slave, b"still here\r\n")
            await anyio.sleep(0.2)
            guest.close_slave()
    listener.close()
    os.close(stdout_write)
    with os.fdopen(stdout_read, "rb") as out:
        assert out.read() == b"still here\r\n"


# ---- attach: finding the instance --------------------------------------------------------------


def test_attach_names_what_is_running_when_it_cannot_choose(tmp_path: Path) -> None:
    base = tmp_path / "rt"
    with pytest.raises(SupervisorError, match="no running agentvm instance"):
        attach.find_console(base, None)
    for name in ("proj-aaaa1111", "proj-bbbb2222", "other-cccc3333"):
        bind_console_socket(_live_instance(base, name) / "console.sock").close()
    dead = runtime.create_instance_dir(base, "dead-dddd4444")
    runtime.write_state(dead, runtime.InstanceState("dead-dddd4444", 999_999_999, 1, 0))
    (dead / "console.sock").touch()
    with pytest.raises(SupervisorError, match=r"3 instances are running \(other-cccc3333, proj-aaaa1111"):
        attach.find_console(base, None)
    with pytest.raises(SupervisorError, match="'proj' matches 2 instances"):
        attach.find_console(base, "proj")
    with pytest.raises(SupervisorError, match="no running instance is called 'dead-dddd4444'"):
        attach.find_console(base, "dead-dddd4444")
    assert attach.find_console(base, "other") == ("other-cccc3333", base / "other-cccc3333" / "console.sock")
    assert attach.find_console(base, "proj-bbbb2222")[0] == "proj-bbbb2222"


def test_attach_without_a_running_instance_says_so_and_exits_66(tmp_path: Path) -> None:
    result = run_supervisor(["attach", "--runtime-dir", str(tmp_path / "none")])
    assert result.returncode == 66
    assert "no running agentvm instance of this user under" in result.stderr


def test_a_bad_escape_key_is_a_usage_error_naming_the_field(tmp_path: Path) -> None:
    result = run_supervisor(["run", "--escape-key", "ctrl-ä", "--runtime-dir", str(tmp_path), "--", "true"])
    assert result.returncode == 64
    assert "$.console.escape-key (or --escape-key): invalid escape key 'ctrl-ä'" in result.stderr
    assert not any(tmp_path.iterdir())


# ---- pieces ------------------------------------------------------------------------------------


def test_escape_keys_parse_and_the_escape_reader_splits_commands() -> None:
    assert [parse_escape_key(k) for k in ("ctrl-]", "C-a", "^^", "~", "none")] == [
        0x1D,
        1,
        0x1E,
        ord("~"),
        None,
    ]
    for bad in ("ctrl-", "ctrl-ab", "é", ""):
        with pytest.raises(ValueError, match="invalid escape key"):
            parse_escape_key(bad)
    commands: list[str] = []
    reader = EscapeReader(0x1D, commands.append)
    assert reader.feed(b"ab\x1d") == b"ab"  # the escape key may end one read
    assert reader.feed(b".cd\x1d\x1de\x03\x1a\x1c") == b"cd\x1de\x03\x1a\x1c"  # Ctrl-C/Z/\ pass
    assert commands == ["."]
    assert EscapeReader(None, commands.append).feed(b"\x1d.") == b"\x1d."


def test_the_replay_buffer_is_bounded_and_starts_clean() -> None:
    replay = ReplayBuffer(100)
    replay.append(b"short")
    assert replay.since() == b"short"
    for index in range(100):
        replay.append(b"\x1b[1mline %03d\x1b[0m\r\n" % index)
    recent = replay.since()
    assert (
        len(recent) <= 100
        and recent.startswith((b"\x1b", b"line"))
        and recent.endswith(b"line 099\x1b[0m\r\n")
    )
    mark = replay.total
    replay.append(b"after the mark")
    assert replay.since(mark) == b"after the mark"
    assert replay.since(0) == replay.since()  # too old: the recent past instead


def test_the_console_log_rotates_and_old_instances_logs_go(tmp_path: Path) -> None:
    for index in range(5):
        (tmp_path / f"old-{index}.log").write_bytes(b"x")
        os.utime(tmp_path / f"old-{index}.log", (index, index))
    log = open_log(tmp_path, "new-0001", max_bytes=10_000, keep=3)
    for _ in range(100):
        log.write(b"y" * 1000)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "new-0001.log",
        "new-0001.log.1",
        "old-3.log",
        "old-4.log",
    ]
    sizes = [(tmp_path / name).stat().st_size for name in ("new-0001.log", "new-0001.log.1")]
    assert all(size <= 10_000 for size in sizes)
    assert (tmp_path / "new-0001.log").stat().st_mode & 0o777 == 0o600


def test_a_log_that_cannot_be_written_stops_logging_and_says_so(tmp_path: Path) -> None:
    log = open_log(tmp_path, "x", max_bytes=4096, keep=1)
    os.close(log._fd)  # inject the failure: the fd is gone under it
    with structlog.testing.capture_logs() as logs:
        log.write(b"data")
        log.flush()  # does not raise
        log.write(b"more")
        log.close()
    assert [entry["event"] for entry in logs] == ["console log disabled"]


def test_terminal_modes_undo_and_redo_what_the_guest_turned_on() -> None:
    from supervisor.console.filter import OutputFilter

    modes = TerminalModes()
    parser = OutputFilter(on_sequence=modes.sequence)
    parser.feed(b"\x1b[?1049h\x1b[?1000;1006h\x1b[?20")  # a sequence cut by the end of a read
    parser.feed(b"04h\x1b=\x1b[>1u\x1b[?25l\x1b[?1000l")
    assert modes.undo() == b"\x1b[?1049l\x1b[?1006l\x1b[?2004l\x1b[?25h\x1b>\x1b[<1u\x1b[0m"
    assert modes.before_replay() == b"\x1b[?1049h"
    assert modes.after_replay() == b"\x1b[?1006h\x1b[?2004h\x1b[?25l\x1b=\x1b[>1u"
    parser.feed(b"\x1b[?1049l\x1b[?1006l\x1b[?2004l\x1b[?25h\x1b>\x1b[<u")
    assert modes.undo() == b""


def test_qemu_gets_the_resize_port(tmp_path: Path) -> None:
    from supervisor.config import Accel, Machine

    argv = qemu_argv(
        QemuSpec(
            binary="qemu-system-x86_64", instance="i", machine=Machine.Q35, accel=Accel.TCG, cpu="max",
            kernel=tmp_path / "k", initrd=None, cmdline="", memory_mib=256, vcpus=1, shares=[],
            private_qmp_fd=3, public_qmp_fd=4, status_fd=5, extra_args=[], resize_fd=9,
        )
    )  # fmt: skip
    joined = " ".join(argv)
    assert "-chardev socket,id=resize,fd=9" in joined
    assert "virtserialport,chardev=resize,name=org.agentvm.resize,bus=vser0.0" in joined


def test_the_filter_hands_every_mode_switch_to_the_tracker_however_the_output_is_split(
    scan: SafeRunEnd,
) -> None:
    from supervisor.console.filter import OutputFilter

    switches = (
        b"\x1b[?1049h",
        b"\x1b[?2004h",
        b"\x1b=",
        b"\x1b[>4;2m",
        b"\x1b[2;20r",
        b"\x1b[4h",
        b"\x1b[>1u",
    )
    data = b"x\x1b[1m" + b"".join(switches) + b" text\x1b[0m"
    expected = TerminalModes()
    for switch in switches:
        expected.sequence(switch)
    for cut in range(len(data) + 1):
        modes = TerminalModes()
        output_filter = OutputFilter(on_sequence=modes.sequence, scan=scan)
        output_filter.feed(data[:cut])
        output_filter.feed(data[cut:])
        assert modes.undo() == expected.undo() != b"", cut
        assert modes.after_replay() == expected.after_replay()
