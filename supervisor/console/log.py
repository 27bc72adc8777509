"""What the console showed: a bounded replay buffer for attach, and a bounded, rotated log file.

Both hold the output as the user's terminal got it (after the hostile-output filter), so
`cat`-ing the log is as safe as watching the console was.

The log lives outside the runtime dir (which goes with the instance) so that it can be read after
the VM is gone: LOG_DIR/INSTANCE.log, 0600 in a 0700 dir (default
$XDG_STATE_HOME/agentvm-supervise/console). At `max_bytes` it is renamed to INSTANCE.log.1 (the
previous .1 goes) and a new one starts, so one instance never holds more than twice that; when a
new log is opened, the logs of all but the newest `keep` instances are removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import structlog

from supervisor.errors import ExitCode, SupervisorError

LOG_SUFFIX = ".log"


class ReplayBuffer:
    """The last `limit` bytes of console output, and how many bytes there ever were."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()
        self._start = 0  # stream offset of self._data[0]

    @property
    def total(self) -> int:
        return self._start + len(self._data)

    def append(self, data: bytes) -> None:
        self._data += data
        excess = len(self._data) - self._limit
        if excess > self._limit:  # trim in bulk: amortized O(1) per byte
            del self._data[:excess]
            self._start += excess

    def since(self, offset: int | None = None) -> bytes:
        """Output from stream offset `offset` on, or (None, or too old) the whole recent past.

        The recent past starts at a clean point when it can (an ESC, or just after a newline), not
        in the middle of an escape sequence or a character that began before the buffer's window.
        """
        if offset is not None and offset >= self.total - min(len(self._data), self._limit):
            return bytes(self._data[offset - self._start :])
        view = self._data[-self._limit :]
        if self._start == 0 and len(self._data) <= self._limit:
            return bytes(view)  # nothing was ever cut off
        clean = min(
            (index + skip for index, skip in ((view.find(b"\x1b"), 0), (view.find(b"\n"), 1)) if index >= 0),
            default=0,
        )
        return bytes(view[clean:])


class ConsoleLog:
    """Appends console output to LOG_DIR/INSTANCE.log, rotating it at `max_bytes`.

    Output is gathered and written FLUSH_AT bytes at a time: it arrives a PTY read (4 KiB) at a
    time, and a write per read costs a tenth of the console's throughput. Whoever writes flushes
    once output has waited long enough (`pending_since`), so the file is never far behind.
    """

    FLUSH_AT = 64 << 10

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._pending = bytearray()
        self.pending_since: float | None = None  # time.monotonic() of the oldest unwritten byte

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        if self._fd < 0 or not data:
            return
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        self._pending += data
        if len(self._pending) >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        self.pending_since = None
        try:
            while self._fd >= 0 and self._pending:
                if self._size >= self._max_bytes:
                    self._rotate()
                size = min(len(self._pending), self._max_bytes - self._size)
                part = self._pending if size == len(self._pending) else self._pending[:size]
                written = os.write(self._fd, part)
                while written < size:  # a regular file takes it all, unless the disk is full
                    written += os.write(self._fd, part[written:])
                self._size += size
                del self._pending[:size]
        except OSError as exc:
            # A full disk must not take the console down with it: stop logging, say so once.
            structlog.get_logger().warning("console log disabled", path=str(self.path), reason=exc.strerror)
            self._pending.clear()
            self.close()

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        previous = self.path.with_name(self.path.name + ".1")
        # Unlink first: renaming over an existing file makes ext4 write the renamed file's data
        # out at once (auto_da_alloc), 1-2 ms per MiB-sized log, and the guest waits for it.
        previous.unlink(missing_ok=True)
        self.path.rename(previous)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def open_log(directory: Path, instance: str, *, max_bytes: int, keep: int) -> ConsoleLog:
    """Create the log dir if needed, prune old instances' logs, open this instance's log."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _prune(directory, keep - 1)
        return ConsoleLog(directory / f"{instance}{LOG_SUFFIX}", max_bytes)
    except OSError as exc:
        raise SupervisorError(
            f"cannot write the console log in {directory} ({exc.strerror}): make it writable, choose "
            "another dir with console.log-dir in the config, or turn the log off with console.log = false",
            exit_code=ExitCode.CANT_CREATE,
        ) from None


def _prune(directory: Path, keep: int) -> None:
    logs = sorted(
        (path for path in directory.iterdir() if path.name.endswith(LOG_SUFFIX) and path.is_file()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for old in logs[max(keep, 0) :]:
        for path in (old, old.with_name(old.name + ".1")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
