"""The built-in guest's status port: what the guest says about its command, read with a bound.

The guest's /init writes one line to a virtio-serial port: `agentvm-exit-status=N` (N in 0..255,
ASCII digits) or `agentvm-guest-error=TEXT`. QEMU's end of the port is one half of a socketpair
(`-chardev socket,fd=N`) that the supervisor reads; it used to be a file, which a hostile guest
filled at 60 MB/s (host disk), and which was then parsed whole (host memory and minutes).

Now the first CAP bytes are kept and the rest is read and dropped: memory stays bounded, nothing
reaches the disk, and QEMU is never held up by a port nobody reads. The guest is untrusted, so
parsing is strict: a status that is not 1-3 ASCII digits in 0..255 is reported as invalid (it once
read `²` as a digit, and took 256 as a status), and the error text is cut short and stripped of
control characters before it reaches a terminal.
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass

import anyio
import anyio.lowlevel

CAP = 64 << 10  # the guest writes a few dozen bytes; anything past this is hostile or broken
READ_SIZE = 64 << 10
ERROR_TEXT_MAX = 300
STATUS_KEY = b"agentvm-exit-status"
ERROR_KEY = b"agentvm-guest-error"
_STATUS_VALUE = re.compile(rb"[0-9]{1,3}")


@dataclass(frozen=True)
class GuestReport:
    exit_status: int | None = None
    error: str | None = None
    invalid: str | None = None  # the last status line's value, when it was not a valid status
    dropped: int = 0  # bytes the guest wrote past CAP

    def problem(self) -> str | None:
        """Why the guest's report is not an exit status: an invalid one (None: valid, or none)."""
        if self.invalid is None:
            return None
        return (
            f"the built-in guest reported an invalid exit status ({self.invalid}); a status is "
            "0..255 in ASCII digits. The guest's /init or something running as root in the guest "
            "wrote to its status port"
        )

    def overflow(self) -> str | None:
        """Why there is no status from a guest that flooded its port (None: it did not)."""
        if self.exit_status is not None or not self.dropped:
            return None
        return (
            f"the built-in guest wrote more than {CAP >> 10} KiB to its status port ({self.dropped} "
            "bytes were dropped) and no exit status in the first part; something running as root "
            "in the guest wrote to the port"
        )


def _printable(raw: bytes, limit: int) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    cleaned = "".join(char if char.isprintable() else "?" for char in text)
    return cleaned + ("..." if len(raw) > limit else "")


def parse_status(data: bytes, *, dropped: int = 0) -> GuestReport:
    """The guest's report from the bytes kept from its status port; the last status line decides."""
    status: int | None = None
    invalid: str | None = None
    error: str | None = None
    for line in data.split(b"\n"):
        key, _, value = line.strip().partition(b"=")
        if key == STATUS_KEY:
            if _STATUS_VALUE.fullmatch(value) and int(value) <= 255:
                status, invalid = int(value), None
            else:
                status, invalid = None, repr(_printable(value, 40))
        elif key == ERROR_KEY:
            error = _printable(value, ERROR_TEXT_MAX)
    return GuestReport(status, error, invalid, dropped)


class StatusPort:
    """Reads the supervisor's half of the status socketpair until EOF (QEMU gone), keeping CAP bytes."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._kept = bytearray()
        self._dropped = 0
        self._eof = False
        self.closed = anyio.Event()

    def _take(self, chunk: bytes) -> None:
        room = CAP - len(self._kept)
        self._kept += chunk[:room]
        self._dropped += max(0, len(chunk) - room)

    def _drain(self) -> bool:
        """Read what is there; False once nothing more is readable right now."""
        try:
            chunk = self._sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self._eof = True
            self.closed.set()
            return False
        self._take(chunk)
        return True

    async def run(self) -> None:
        while not self._eof:
            await anyio.wait_readable(self._sock)
            while self._drain():
                await anyio.lowlevel.checkpoint()

    def report(self) -> GuestReport:
        """What the guest reported; first takes whatever is still buffered in the socket."""
        with contextlib.suppress(OSError):
            for _ in range(64):  # QEMU has exited: at most a socket buffer's worth is left
                if self._eof or not self._drain():
                    break
        return parse_status(bytes(self._kept), dropped=self._dropped)

    def close(self) -> None:
        self._sock.close()
