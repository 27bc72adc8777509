"""Logging: structlog, configured once by the CLI.

Human-readable lines on a terminal, JSON lines otherwise. Events carry the child they concern
(`child="virtiofsd[work]"`, `pid=…`); the CLI binds the instance id once (bind_instance) so every
line has it. Logs go to stderr, never into the console stream on stdout. Records of the standard
library's `logging` (asyncio, pyudev) go through the same renderer and stream, so they too get
CRLF on a raw terminal. Under systemd (JOURNAL_STREAM names our stderr) each line starts with its
syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug), which journald strips and
keeps as the entry's priority.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import termios
from collections.abc import Mapping
from typing import Any, TextIO

import structlog


class TerminalSafeStream:
    """Writes log lines to a stream; on a terminal in raw mode (OPOST off) ends lines with CRLF.

    The console proxy puts the user's terminal in raw mode, where a bare LF moves down without
    returning to column 0. Looking at the terminal's flags on each write keeps this stateless.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._is_tty = stream.isatty()

    def write(self, text: str) -> int:
        if self._is_tty and "\n" in text and not self._output_processed():
            text = text.replace("\r\n", "\n").replace("\n", "\r\n")
        try:
            return self._stream.write(text)
        except (BrokenPipeError, BlockingIOError, OSError):
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.flush()

    def _output_processed(self) -> bool:
        try:
            return bool(termios.tcgetattr(self._stream.fileno())[1] & termios.OPOST)
        except termios.error:
            return True


# sd-daemon(3) priority prefixes, by structlog's method name.
JOURNAL_PRIORITY = {"critical": "<2>", "exception": "<3>", "error": "<3>", "warning": "<4>", "info": "<6>"}


def journal_stream(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when `stream` is the journal stream systemd connected (JOURNAL_STREAM=DEV:INODE names
    it), not merely inherited by a child whose stderr went elsewhere."""
    try:
        device, inode = (int(part) for part in env.get("JOURNAL_STREAM", "").split(":"))
        found = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (found.st_dev, found.st_ino) == (device, inode)


class _JournalPriority:
    """Wraps a renderer: its line, led by the event's syslog priority."""

    def __init__(self, render: Any) -> None:
        self._render = render

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        return JOURNAL_PRIORITY.get(method_name, "<7>") + str(self._render(logger, method_name, event_dict))


class _ToStructlog(logging.Handler):
    """The standard library's records, logged through structlog (one renderer, one stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            structlog.get_logger().log(
                record.levelno, record.getMessage(), logger=record.name, exc_info=record.exc_info
            )
        except Exception:
            self.handleError(record)


def bind_instance(instance: str) -> None:
    """Every line logged from here on (and in tasks started later) carries `instance=`."""
    structlog.contextvars.bind_contextvars(instance=instance)


def configure(
    *,
    json: bool | None = None,
    level: int | None = None,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
) -> None:
    """JSON unless `stream` is a terminal. On a terminal the default level is WARNING, because the
    guest's console shares the screen; elsewhere INFO, so collected logs show the whole lifecycle.
    `env` is read for JOURNAL_STREAM only."""
    target = stream if stream is not None else sys.stderr
    if json is None:
        json = not target.isatty()
    if level is None:
        level = logging.INFO if json else logging.WARNING
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso" if json else "%H:%M:%S", utc=json),
    ]
    render: Any
    if json:
        processors.append(structlog.processors.dict_tracebacks)
        render = structlog.processors.JSONRenderer()
    else:
        render = structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    processors.append(_JournalPriority(render) if journal_stream(target, env) else render)
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if isinstance(handler, _ToStructlog)]:
        root.removeHandler(handler)  # configured again (tests): one forwarder only
    root.addHandler(_ToStructlog())
    root.setLevel(level)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(TerminalSafeStream(target)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
