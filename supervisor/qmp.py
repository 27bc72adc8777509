"""A minimal QMP client for the supervisor's private control channel to QEMU.

The supervisor hands QEMU one end of a socketpair (`-chardev socket,fd=N -mon mode=control`), so
it has a QMP connection from the first instant, shared with nobody and with no socket file to race
on. Events (SHUTDOWN in particular) are delivered to a callback as they arrive.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog

MAX_LINE = 1 << 20


class QmpError(Exception):
    pass


class QmpClient:
    def __init__(self, sock: socket.socket, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self._sock = sock
        self._on_event = on_event
        self._stream: anyio.abc.SocketStream | None = None
        self._replies: anyio.abc.ObjectSendStream[dict[str, Any]] | None = None
        self._reply_receive: anyio.abc.ObjectReceiveStream[dict[str, Any]] | None = None
        self._lock = anyio.Lock()
        self.ready = anyio.Event()
        self.closed = anyio.Event()
        self._log = structlog.get_logger().bind(child="runner", channel="qmp")

    async def run(self) -> None:
        """Read greeting, negotiate, then dispatch replies and events until QEMU closes the socket."""
        self._stream = await anyio.abc.UNIXSocketStream.from_socket(self._sock)
        self._replies, self._reply_receive = anyio.create_memory_object_stream[dict[str, Any]](16)
        buffer = b""
        negotiated = False
        try:
            async with self._stream:
                try:
                    await self._stream.send(b'{"execute":"qmp_capabilities"}\n')
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
                        elif not negotiated:
                            negotiated = True
                            self.ready.set()
                        else:
                            await self._replies.send(message)
        finally:
            self.closed.set()
            self.ready.set()
            self._replies.close()
            self._reply_receive.close()  # a waiting execute() gets QmpError, and nothing is left open

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply; raises QmpError if QEMU is gone or refuses."""
        await self.ready.wait()
        if self.closed.is_set() or self._stream is None or self._reply_receive is None:
            raise QmpError("QEMU's QMP channel is closed")
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        async with self._lock:
            try:
                await self._stream.send(msgspec.json.encode(request) + b"\n")
                reply = await self._reply_receive.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                raise QmpError("QEMU closed its QMP channel") from None
        if "error" in reply:
            raise QmpError(str(reply["error"].get("desc", reply["error"])))
        self._log.debug("qmp", command=command)
        return dict(reply.get("return") or {})
