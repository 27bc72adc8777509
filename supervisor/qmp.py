"""A minimal QMP client for the supervisor's private control channel to QEMU.

The supervisor hands QEMU one end of a socketpair (`-chardev socket,fd=N -mon mode=control`), so
it has a QMP connection from the first instant, shared with nobody and with no socket file to race
on. Events (SHUTDOWN in particular) are delivered to a callback as they arrive.

Every command carries an `id`, which QEMU copies into its reply: a reply goes to the command that
asked for it, or nowhere. (Matching by order handed a cancelled command's late reply to the next one.)
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog

MAX_LINE = 1 << 20


NEGOTIATE_ID = "negotiate"


class QmpError(Exception):
    pass


@dataclass
class _Waiter:
    """One command's slot for its reply; None once the channel closed without one."""

    done: anyio.Event = field(default_factory=anyio.Event)
    reply: dict[str, Any] | None = None


class QmpClient:
    def __init__(self, sock: socket.socket, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self._sock = sock
        self._on_event = on_event
        self._stream: anyio.abc.SocketStream | None = None
        self._waiters: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._send_lock = anyio.Lock()  # one request line at a time on the socket
        self.ready = anyio.Event()
        self.closed = anyio.Event()
        self._log = structlog.get_logger().bind(child="runner", channel="qmp")

    async def run(self) -> None:
        """Read greeting, negotiate, then dispatch replies and events until QEMU closes the socket."""
        self._stream = await anyio.abc.UNIXSocketStream.from_socket(self._sock)
        buffer = b""
        try:
            async with self._stream:
                try:
                    await self._stream.send(
                        msgspec.json.encode({"execute": "qmp_capabilities", "id": NEGOTIATE_ID}) + b"\n"
                    )
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return  # QEMU exited before we could say hello (e.g. a bad argument)
                while True:
                    try:
                        chunk = await self._stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        break
                    buffer += chunk
                    if len(buffer) > MAX_LINE:
                        raise QmpError("QMP message over 1 MiB")
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        message = msgspec.json.decode(line)
                        if not isinstance(message, dict):
                            continue
                        if "QMP" in message:
                            continue
                        if "event" in message:
                            self._on_event(str(message["event"]), dict(message.get("data") or {}))
                        elif message.get("id") == NEGOTIATE_ID:
                            self.ready.set()
                        else:
                            self._deliver(message)
        finally:
            self.closed.set()
            self.ready.set()
            for waiter in self._waiters.values():
                waiter.done.set()  # no reply: a waiting execute() gets QmpError

    def _deliver(self, reply: dict[str, Any]) -> None:
        waiter = self._waiters.get(reply["id"]) if isinstance(reply.get("id"), int) else None
        if waiter is None:
            # The reply of a command whose caller gave up (cancelled by a deadline): nobody's.
            self._log.debug("qmp reply without a waiter", id=reply.get("id"))
            return
        waiter.reply = reply
        waiter.done.set()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply; raises QmpError if QEMU is gone or refuses."""
        await self.ready.wait()
        if self.closed.is_set() or self._stream is None:
            raise QmpError("QEMU's QMP channel is closed")
        request_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            request["arguments"] = arguments
        waiter = self._waiters[request_id] = _Waiter()
        try:
            async with self._send_lock:
                await self._stream.send(msgspec.json.encode(request) + b"\n")
            await waiter.done.wait()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            raise QmpError("QEMU closed its QMP channel") from None
        finally:
            del self._waiters[request_id]
        reply = waiter.reply
        if reply is None:
            raise QmpError("QEMU closed its QMP channel")
        if "error" in reply:
            raise QmpError(str(reply["error"].get("desc", reply["error"])))
        self._log.debug("qmp", command=command)
        return dict(reply.get("return") or {})
