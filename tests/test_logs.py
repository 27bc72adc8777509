"""logs.py: the renderers on a real terminal and on a pipe, with the lowest structlog allowed too
(tests/lowest_versions.sh runs this file)."""

from __future__ import annotations

import io
import os
import pty
import termios
from collections.abc import Iterator

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
