"""logs.py: the renderers on a real terminal and on a pipe, with the lowest structlog allowed too
(tests/lowest_versions.sh runs this file)."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import select
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from supervisor import logs


@pytest.fixture
def terminal() -> Iterator[tuple[io.TextIOWrapper, int]]:
    """A real PTY: the slave as a text stream (what stderr is on a terminal), the master to read."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", buffering=1)
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)
        structlog.reset_defaults()


def _read(master: int) -> bytes:
    ready, _, _ = select.select([master], [], [], 10)
    assert ready, "nothing reached the terminal"
    return os.read(master, 65536)


def test_human_renderer_on_a_terminal_works_with_the_installed_structlog(
    terminal: tuple[io.TextIOWrapper, int],
) -> None:
    """Regression (issue 11): ConsoleRenderer(pad_event_to=0) raised TypeError on structlog < 25.5,
    which pyproject allowed: every command with a terminal on stderr crashed."""
    stream, master = terminal
    logs.configure(stream=stream, level=20)
    structlog.get_logger().warning("disk almost full", share="work")
    line = _read(master)
    assert b"disk almost full" in line and b"share=work" in line


def test_raw_terminal_gets_crlf(terminal: tuple[io.TextIOWrapper, int]) -> None:
    stream, master = terminal
    attrs = termios.tcgetattr(stream.fileno())
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(stream.fileno(), termios.TCSANOW, attrs)
    logs.configure(stream=stream, level=20)
    structlog.get_logger().warning("one")
    assert _read(master).endswith(b"\r\n")


def test_stdlib_logging_goes_through_the_same_renderer_and_gets_crlf_on_a_raw_terminal(
    terminal: tuple[io.TextIOWrapper, int],
) -> None:
    """Regression (issue 11): asyncio's and pyudev's records went to logging's last-resort handler,
    a bare LF on the raw terminal, in another format."""
    stream, master = terminal
    attrs = termios.tcgetattr(stream.fileno())
    attrs[1] &= ~termios.OPOST
    termios.tcsetattr(stream.fileno(), termios.TCSANOW, attrs)
    logs.configure(stream=stream, level=logging.INFO)
    logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Task>", 0.25)
    line = _read(master)
    assert b"Executing <Task> took 0.250 seconds" in line and b"[asyncio]" in line
    assert line.endswith(b"\r\n") and b"\n" not in line.replace(b"\r\n", b"")


def _journal_env(path: Path) -> dict[str, str]:
    found = path.stat()
    return {"JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}


def test_json_lines_carry_the_journal_priority_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    """Issue 11: under systemd every JSON line reached the journal at priority info."""
    path = tmp_path / "journal"
    with path.open("w", buffering=1) as stream:
        logs.configure(json=True, level=logging.DEBUG, stream=stream, env=_journal_env(path))
        log = structlog.get_logger()
        log.error("broken")
        log.warning("odd")
        log.info("fine")
        log.debug("detail")
        logging.getLogger("pyudev").warning("from the stdlib")
    structlog.reset_defaults()
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>", "<7>", "<4>"]
    assert [json.loads(line[3:])["event"] for line in lines] == [
        "broken", "odd", "fine", "detail", "from the stdlib",
    ]  # fmt: skip


@pytest.mark.parametrize("journal_stream", ["", "garbage", "1:2"])
def test_no_priority_prefix_when_stderr_is_not_the_journal_stream(
    tmp_path: Path, journal_stream: str
) -> None:
    """A JOURNAL_STREAM inherited by a process whose stderr was redirected names another file."""
    path = tmp_path / "log"
    with path.open("w", buffering=1) as stream:
        logs.configure(json=True, stream=stream, env={"JOURNAL_STREAM": journal_stream})
        structlog.get_logger().warning("plain")
    structlog.reset_defaults()
    assert json.loads(path.read_text())["event"] == "plain"


def test_the_bound_instance_is_on_every_line(tmp_path: Path) -> None:
    path = tmp_path / "log"
    with path.open("w", buffering=1) as stream:
        logs.configure(json=True, stream=stream, env={})
        logs.bind_instance("demo-1234")
        try:
            structlog.get_logger().bind(child="runner").info("started")
            logging.getLogger("asyncio").error("from the stdlib")
        finally:
            structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    assert [json.loads(line)["instance"] for line in path.read_text().splitlines()] == ["demo-1234"] * 2
