"""inotify through libc: the file events readiness (a socket appearing) and the KVM watch use.

The stdlib has no inotify and the event format is small enough to parse here (one struct per
event); the masks are the kernel's, from <sys/inotify.h>.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import anyio

IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT_HEADER = struct.Struct("iIII")


class Inotify:
    """A minimal inotify instance: add watches, await batches of (mask, name) events."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def add_watch(self, path: Path, mask: int) -> int:
        wd: int = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
        return wd

    async def read_events(self) -> list[tuple[int, str]]:
        while True:
            await anyio.wait_readable(self.fd)
            events = self.read_nowait()
            if events:
                return events

    def read_nowait(self) -> list[tuple[int, str]]:
        """The events queued now; [] if none (for callers that multiplex the fd themselves)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        events = []
        offset = 0
        while offset < len(data):
            _wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            offset += _EVENT_HEADER.size
            name = data[offset : offset + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
            offset += length
            events.append((mask, name))
        return events

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
