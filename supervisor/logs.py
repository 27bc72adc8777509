"""Logging: structlog, configured once by the CLI.

Human-readable lines on a terminal, JSON lines otherwise. Events carry the child they concern
(`child="virtiofsd[work]"`, `pid=…`). Logs go to stderr, never into the console stream on stdout.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import termios
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


def configure(*, json: bool | None = None, level: int | None = None, stream: TextIO | None = None) -> None:
    """JSON unless `stream` is a terminal. On a terminal the default level is WARNING, because the
    guest's console shares the screen; elsewhere INFO, so collected logs show the whole lifecycle."""
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
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(TerminalSafeStream(target)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
