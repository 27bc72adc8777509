"""What the console showed: a bounded replay buffer for attach, and a bounded, rotated log file.

Both hold the output as the user's terminal got it (after the hostile-output filter), so
`cat`-ing the log is as safe as watching the console was.

The log lives outside the runtime dir (which goes with the instance) so that it can be read after
the VM is gone: LOG_DIR/INSTANCE.log, 0600 in a 0700 dir (default
$XDG_STATE_HOME/agentvm-supervise/console). At `max_bytes` it is renamed to INSTANCE.log.1 (the
previous .1 goes) and a new one starts, so one instance never holds more than twice that; when a
new log is opened, the logs of all but the newest `keep` instances are removed.

The dir must be ours: a log dir another user owns or may write (say a 0777 dir root was pointed at)
would let that user swap a log for a symlink to any file. So a dir owned by someone else, or a
symlink, is refused; our own dir that others may write is made 0700; every file operation goes
through the dir's fd and none follows a symlink (O_NOFOLLOW, rename and unlink of the link itself).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from pathlib import Path

import structlog

from supervisor import diskfull
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

    def __init__(self, path: Path, max_bytes: int, dir_fd: int) -> None:
        self.path = path
        self._dir_fd = dir_fd  # ours: closed with the log
        self._max_bytes = max_bytes
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._pending = bytearray()
        self.pending_since: float | None = None  # time.monotonic() of the oldest unwritten byte

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(self.path.name, flags, 0o600, dir_fd=self._dir_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():  # a FIFO, a device, not ours
            os.close(fd)
            raise OSError(0, f"{self.path} is not a regular file of this user")
        os.set_blocking(fd, True)
        return fd

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
            reason = diskfull.full_disk_message(self.path, exc) or exc.strerror
            structlog.get_logger().warning("console log disabled", path=str(self.path), reason=reason)
            self._pending.clear()
            self.close()

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        previous = self.path.name + ".1"
        # Unlink first: renaming over an existing file makes ext4 write the renamed file's data
        # out at once (auto_da_alloc), 1-2 ms per MiB-sized log, and the guest waits for it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(previous, dir_fd=self._dir_fd)
        os.rename(self.path.name, previous, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        self._fd = self._open()
        self._size = 0

    def close(self) -> None:
        self.flush()
        for fd in (self._fd, self._dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dir_fd = -1


REMEDY = "choose another dir with console.log-dir in the config, or turn the log off with console.log = false"


def open_log(directory: Path, instance: str, *, max_bytes: int, keep: int) -> ConsoleLog:
    """Create the log dir if needed (or check the one there), prune old instances' logs, open this
    instance's log."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        why = "it is a symlink" if directory.is_symlink() else exc.strerror
        raise SupervisorError(
            f"cannot use {directory} for the console log ({why}): make it a directory of yours, {REMEDY}",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    try:
        _check_dir(directory, dir_fd)
        _prune(dir_fd, keep - 1)
        return ConsoleLog(directory / f"{instance}{LOG_SUFFIX}", max_bytes, dir_fd)
    except OSError as exc:
        os.close(dir_fd)
        raise SupervisorError(
            f"cannot write the console log in {directory} ({exc.strerror}): make it writable, {REMEDY}",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    except SupervisorError:
        os.close(dir_fd)
        raise


def _check_dir(directory: Path, dir_fd: int) -> None:
    info = os.fstat(dir_fd)
    if info.st_uid != os.geteuid():
        raise SupervisorError(
            f"the console log dir {directory} belongs to uid {info.st_uid}, not to this user (uid "
            f"{os.geteuid()}), who could replace a log with a link to any file: {REMEDY}",
            exit_code=ExitCode.CANT_CREATE,
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        # Ours, but open to others: the console may show secrets, and others could plant links.
        os.fchmod(dir_fd, 0o700)
        structlog.get_logger().warning(
            "the console log dir was open to other users; made it 0700",
            path=str(directory),
            mode=f"{stat.S_IMODE(info.st_mode):o}",
        )


def _prune(dir_fd: int, keep: int) -> None:
    with os.scandir(dir_fd) as entries:
        logs = sorted(
            (
                (entry.stat(follow_symlinks=False).st_mtime, entry.name)
                for entry in entries
                if entry.name.endswith(LOG_SUFFIX) and entry.is_file(follow_symlinks=False)
            ),
            reverse=True,
        )
    for _, name in logs[max(keep, 0) :]:
        for old in (name, name + ".1"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old, dir_fd=dir_fd)
