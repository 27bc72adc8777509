"""The control socket: INSTANCE/control.sock (0600), a small versioned request/response protocol.

Protocol version 1. A client connects, sends ONE request as a JSON object on one line (at most
MAX_REQUEST bytes, newline included; end of input also ends it), and gets ONE reply line, after
which the supervisor closes the connection:

    {"v": 1, "op": "status"}
    {"v": 1, "op": "stop", "deadline": 5}      deadline (s): how long the guest has to power off
    -> {"v": 1, "ok": true, "status": {...}}   or   {"v": 1, "ok": false, "error": "..."}

An unknown op or version, bytes that are not JSON, a request over MAX_REQUEST, or no request within
REQUEST_TIMEOUT get an error reply and the connection is closed; nothing a client does can raise
out of the server. Each connection is its own task with a deadline, reads are bounded, and the
server lives in the instance's task group, so a slow or silent client stalls neither the console
nor teardown. Only the supervisor's own user (and root) may talk to it: the socket and its dir are
0700/0600, and the peer's uid is checked too.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Annotated, Literal, Protocol

import anyio
import anyio.abc
import msgspec
import structlog

from supervisor import accepting
from supervisor.children import Child, describe_status, exit_code_of
from supervisor.peer import peer_of
from supervisor.virtiofsd import ShareSpec

PROTOCOL_VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_REPLY = 4 * 1024 * 1024
REQUEST_TIMEOUT = 5.0  # from accept to a complete request
REPLY_TIMEOUT = 2.0  # to hand the reply to a client that does not read
MAX_CONNECTIONS = 32  # beyond this, new clients get "busy" at once
OPS = ("status", "stop")

Phase = Literal["starting", "running", "stopping"]


# ---- messages --------------------------------------------------------------------------------


class _Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="op"):
    v: int = PROTOCOL_VERSION


class StatusRequest(_Request, frozen=True, tag="status"):
    pass


class StopRequest(_Request, frozen=True, tag="stop"):
    # None: the instance's own graceful-stop timeout; then QMP quit, then TERM/KILL as usual.
    deadline: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None


Request = StatusRequest | StopRequest


class _Envelope(msgspec.Struct, frozen=True):
    """What every version has in common; read first so the version and op errors are plain."""

    v: int
    op: str


class ChildInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    pid: int
    state: Literal["running", "exited"]
    started: float  # Unix time
    exit_status: int | None = None  # as a shell reports it: 128+N for signal N
    exit_detail: str | None = None  # "status 0", "killed by SIGKILL"


class ShareInfo(msgspec.Struct, frozen=True, kw_only=True):
    tag: str
    source: str
    guest_path: str
    read_only: bool
    socket: str


class EgressInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The allow-list's counts (supervisor/egress: egress_info)."""

    mode: str
    proxy: str
    log: str | None
    connections: int
    active: int
    allowed: int
    denied: int
    errors: int
    busy: int
    bytes_up: int
    bytes_down: int
    top_denied: list[str]  # "HOST:PORT (COUNT)", the most denied first


class InstanceStatus(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    phase: Phase
    supervisor_pid: int
    started: float  # Unix time
    runtime_dir: str
    work_dir: str | None
    accelerator: str
    accelerator_reason: str
    machine: str
    memory_mib: int
    vcpus: int
    guest: str  # "built-in", or the kernel's path
    command: list[str] | None
    console_attached: bool
    stop_cause: str | None
    children: list[ChildInfo]
    shares: list[ShareInfo]
    egress: EgressInfo | None = None  # allowlist mode


class Response(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    v: int  # no default: always present, even with omit_defaults
    ok: bool
    error: str | None = None
    status: InstanceStatus | None = None


def _error(message: str) -> Response:
    return Response(v=PROTOCOL_VERSION, ok=False, error=message)


class ProtocolError(Exception):
    pass


def decode_request(line: bytes) -> Request:
    """One request line -> a typed request; ProtocolError says what is wrong, for the reply."""
    try:
        envelope = msgspec.json.decode(line, type=_Envelope)
    except msgspec.ValidationError as exc:
        raise ProtocolError(
            f"invalid request: {exc}; a request is a JSON object like "
            f'{{"v": {PROTOCOL_VERSION}, "op": "status"}}'
        ) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc}); send one JSON object per line") from None
    if envelope.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {envelope.v} is not supported: this supervisor speaks version "
            f"{PROTOCOL_VERSION}; use an agentvm-supervise of the same version"
        )
    if envelope.op not in OPS:
        raise ProtocolError(f"unknown op '{envelope.op}': the ops are {', '.join(OPS)}")
    try:
        request: Request = msgspec.json.decode(line, type=Request)
        return request
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid '{envelope.op}' request: {exc}") from None


# ---- describing an instance ------------------------------------------------------------------


def child_info(child: Child) -> ChildInfo:
    started = time.time() - (time.monotonic() - child.started_at)
    if child.status is None:
        return ChildInfo(name=child.name, pid=child.pid, state="running", started=started)
    return ChildInfo(
        name=child.name,
        pid=child.pid,
        state="exited",
        started=started,
        exit_status=exit_code_of(child.status),
        exit_detail=describe_status(child.status),
    )


def share_info(share: ShareSpec) -> ShareInfo:
    return ShareInfo(
        tag=share.tag,
        source=str(share.source),
        guest_path=share.guest_path,
        read_only=share.read_only,
        socket=str(share.socket_path),
    )


# ---- the server ------------------------------------------------------------------------------


class Controlled(Protocol):
    """What the server needs from an instance (vm.Instance)."""

    def control_status(self) -> InstanceStatus: ...

    def control_stop(self, deadline: float | None) -> None: ...


class _TooLarge(Exception):
    pass


async def _read_request(stream: anyio.abc.SocketStream) -> bytes | None:
    """The first line, or everything up to end of input; None if the client sent nothing."""
    buffer = b""
    while True:
        try:
            chunk = await stream.receive(MAX_REQUEST + 1 - len(buffer))
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return buffer or None
        buffer += chunk
        line, newline, _ = buffer.partition(b"\n")
        if newline:
            return line
        if len(buffer) > MAX_REQUEST:
            raise _TooLarge


class Server:
    def __init__(self, path: Path, target: Controlled) -> None:
        self.path = path
        self._target = target
        self._active = 0
        self._log = structlog.get_logger().bind(control_socket=str(path))

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; every connection is a task of this one's group."""
        listener = await anyio.create_unix_listener(self.path, mode=0o600)
        await accepting.serve_each(
            listener, self._serve_one, log=self._log, what="control socket", task_status=task_status
        )

    async def _serve_one(self, stream: anyio.abc.SocketStream) -> None:
        self._active += 1
        try:
            async with stream:
                reply = await self._reply_to(stream)
                if reply is not None:
                    with anyio.move_on_after(REPLY_TIMEOUT):
                        await stream.send(msgspec.json.encode(reply) + b"\n")
        except Exception as exc:  # a client must never take the supervisor down
            self._log.info("control connection ended badly", reason=repr(exc))
        finally:
            self._active -= 1

    async def _reply_to(self, stream: anyio.abc.SocketStream) -> Response | None:
        if self._active > MAX_CONNECTIONS:
            return _error(f"busy: {MAX_CONNECTIONS} control connections are open; try again")
        peer = peer_of(stream.extra(anyio.abc.SocketAttribute.raw_socket))  # noqa: S610 - anyio, not Django
        if not peer.allowed:
            self._log.warning("control connection from another user refused", uid=peer.uid)
            return _error(f"uid {peer.uid} may not control this instance")
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                line = await _read_request(stream)
        except TimeoutError:
            return _error(f"no complete request within {REQUEST_TIMEOUT:g} s; closing")
        except _TooLarge:
            return _error(f"request over {MAX_REQUEST} bytes; requests are one short JSON line")
        if line is None:
            return None  # connected and left
        return self._handle(line)

    def _handle(self, line: bytes) -> Response:
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            self._log.info("bad control request", reason=str(exc))
            return _error(str(exc))
        try:
            if isinstance(request, StopRequest):
                self._log.warning("stop requested on the control socket", deadline_s=request.deadline)
                self._target.control_stop(request.deadline)
            return Response(v=PROTOCOL_VERSION, ok=True, status=self._target.control_status())
        except Exception as exc:
            self._log.exception("control request failed")
            return _error(f"internal error (a bug) while answering this request: {exc!r}")


# ---- the client (CLI verbs; synchronous) -----------------------------------------------------


class ControlError(Exception):
    """The supervisor could not be reached or answered with an error."""


def call(path: Path, request: Request, *, timeout: float = 5.0) -> InstanceStatus:
    """Send one request and return the status in the reply; ControlError otherwise."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(msgspec.json.encode(request) + b"\n")
            data = _read_reply(sock)
    except TimeoutError:
        raise ControlError(f"no reply within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(exc.strerror or str(exc)) from None
    try:
        response = msgspec.json.decode(data, type=Response)
    except msgspec.DecodeError as exc:
        raise ControlError(f"unreadable reply ({exc})") from None
    if response.v != PROTOCOL_VERSION:
        raise ControlError(
            f"the supervisor speaks protocol version {response.v}, this client {PROTOCOL_VERSION}"
        )
    if not response.ok or response.status is None:
        raise ControlError(response.error or "error reply without a message")
    return response.status


def _read_reply(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk or size > MAX_REPLY:
            break
    return b"".join(chunks).partition(b"\n")[0]
