"""The egress proxy: HTTP CONNECT and absolute-form HTTP, judged by the policy, in the event loop.

Guest connections arrive as file descriptors handed over on the instance's egress.sock (one per
connection, by handoff.py, which QEMU starts per guest connection) or, for tests and the bench, on
a TCP listener. Each is one task in the proxy's task group, which lives in the instance's group:
when the instance ends every connection ends with it, at once.

Per connection: read the request head (within the handshake timeout, at most MAX_HEAD bytes),
decide by the policy, resolve the name on the host and keep only addresses the policy allows,
connect, then for CONNECT read the TLS ClientHello and refuse a server name that differs from the
CONNECT host (no domain fronting through an allowed host), and splice bytes both ways until both
sides are done or nothing moved for the idle timeout. A denial gets a 403 whose body names the rule
and how to allow the host. Every connection ends in exactly one audit record.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import anyio.abc
import structlog

from supervisor import accepting
from supervisor.egress import tls
from supervisor.egress.audit import Audit, Record
from supervisor.egress.rules import IpAddress, Policy, parse_address
from supervisor.peer import peer_of

MAX_HEAD = 16 * 1024
CHUNK = 256 * 1024
_HOP_HEADERS = {b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive"}

Resolver = Callable[[str, int], Awaitable[list[IpAddress]]]


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    max_connections: int = 256  # beyond this a new connection gets 503 at once
    handshake_timeout: float = 10.0  # accept -> request head complete (and the ClientHello)
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0  # a tunnel with no byte either way for this long is closed


class _Refused(Exception):
    """End the connection with this status line, audit rule and explanation."""

    def __init__(self, status: int, rule: str, reason: str, *, verdict: str = "denied") -> None:
        super().__init__(reason)
        self.status, self.rule, self.reason, self.verdict = status, rule, reason, verdict


_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _response(status: int, rule: str, body: str) -> bytes:
    payload = f"agentvm-supervise egress proxy: {body}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"X-Agentvm-Egress-Rule: {rule}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + payload


async def resolve(host: str, port: int) -> list[IpAddress]:
    """getaddrinfo on the host (in a thread), de-duplicated in the resolver's order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    result: list[IpAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        address = parse_address(str(sockaddr[0]))
        if address is not None and address not in result:
            result.append(address)
    return result


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    host, port_text = authority, ""
    if authority.startswith("["):
        end = authority.find("]")
        host, port_text = authority[: end + 1], authority[end + 2 :] if end > 0 else ""
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise _Refused(400, "bad-request", f"bad port in '{authority}'", verdict="error")
        return host.strip("[]").lower().rstrip("."), int(port_text)
    if default_port is None:
        raise _Refused(400, "bad-request", f"CONNECT needs HOST:PORT, got '{authority}'", verdict="error")
    return host.strip("[]").lower().rstrip("."), default_port


class Proxy:
    def __init__(
        self,
        policy: Policy,
        audit: Audit,
        settings: ProxySettings | None = None,
        *,
        resolver: Resolver = resolve,
    ) -> None:
        self.policy = policy
        self.audit = audit
        self.settings = settings or ProxySettings()
        self._resolve = resolver
        self._log = structlog.get_logger()

    # ---- listeners ---------------------------------------------------------------------------

    async def serve_listener(
        self,
        listener: anyio.abc.SocketListener,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve every connection of `listener` (TCP: tests and the bench) until cancelled."""
        await accepting.serve_each(
            listener, self.handle, log=self._log, what="egress proxy", task_status=task_status
        )

    async def serve_handoff(
        self, path: Path, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind `path` (0600) and serve the guest connections handed over on it until cancelled."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o177)
            try:
                server.bind(os.fspath(path))
            finally:
                os.umask(old)
            server.listen(128)
            server.setblocking(False)
            async with anyio.create_task_group() as connections:
                task_status.started()
                while True:
                    await anyio.wait_readable(server)
                    try:
                        conn, _ = server.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        self._log.warning("egress handoff accept failed", reason=str(exc))
                        await anyio.sleep(0.1)
                        continue
                    connections.start_soon(self._take_handoff, conn)
        finally:
            server.close()
            with contextlib.suppress(OSError):
                path.unlink()

    async def _take_handoff(self, conn: socket.socket) -> None:
        """Receive the one fd the handoff helper sends; only from our own uid (or root)."""
        guest: socket.socket | None = None
        try:
            with conn:
                sender = peer_of(conn)
                if not sender.allowed:
                    self._log.warning("egress handoff from another user refused", uid=sender.uid)
                    return
                conn.setblocking(False)
                with anyio.move_on_after(self.settings.handshake_timeout):
                    while True:
                        await anyio.wait_readable(conn)
                        try:
                            _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 4)
                            break
                        except BlockingIOError:
                            continue
                for extra in fds[1:]:
                    os.close(extra)
                if not fds:
                    return
                guest = socket.socket(fileno=fds[0])
            if guest.type != socket.SOCK_STREAM:
                guest.close()
                return
            _grow_buffers(guest)
            stream = await anyio.abc.SocketStream.from_socket(guest)
        except (OSError, ValueError) as exc:
            self._log.info("egress handoff failed", reason=str(exc))
            if guest is not None:
                guest.close()
            return
        await self.handle(stream)

    # ---- one connection ----------------------------------------------------------------------

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        stats = self.audit.stats
        stats.connections += 1
        record = Record(ts=time.time(), kind="-")
        started = time.monotonic()
        stats.active += 1
        upstream: anyio.abc.SocketStream | None = None
        try:
            async with client:
                try:
                    if stats.active > self.settings.max_connections:
                        stats.busy += 1
                        limit = self.settings.max_connections
                        raise _Refused(503, "busy", f"{limit} connections are open", verdict="error")
                    upstream = await self._open(client, record)
                except _Refused as refused:
                    record.verdict, record.rule, record.reason = refused.verdict, refused.rule, refused.reason
                    with anyio.move_on_after(1.0):
                        await client.send(_response(refused.status, refused.rule, refused.reason))
                    return
                if upstream is None:  # closed without an answer (a ClientHello that fails the check)
                    return
                async with upstream:
                    record.verdict = "allowed"
                    # not 443: a ClientHello, if the client speaks TLS, is checked in the splice
                    gate = record.kind == "CONNECT" and record.port != 443
                    await self._splice(client, upstream, record, gate=gate)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            if record.verdict != "allowed":
                record.verdict, record.rule, record.reason = "error", "io-error", str(exc)
        finally:
            stats.active -= 1
            record.duration_ms = round((time.monotonic() - started) * 1000, 1)
            self.audit.record(record)

    async def _open(self, client: anyio.abc.SocketStream, record: Record) -> anyio.abc.SocketStream | None:
        """Read and judge the request; the upstream connection, ready for the splice."""
        settings = self.settings
        try:
            with anyio.fail_after(settings.handshake_timeout):
                head, rest = await _read_head(client)
        except TimeoutError:
            raise _Refused(
                408,
                "handshake-timeout",
                f"no complete request within {settings.handshake_timeout:g} s",
                verdict="error",
            ) from None
        method, target, version, headers = _parse_head(head)
        record.kind = method
        if method == "CONNECT":
            host, port = _split_authority(target, None)
        else:
            url = urlsplit(target)
            if url.scheme != "http" or not url.netloc:
                raise _Refused(
                    400, "bad-request",
                    f"'{method} {target[:200]}' is not a proxy request: use CONNECT for HTTPS and an "
                    "absolute http:// URL for plain HTTP (set HTTP_PROXY/HTTPS_PROXY)",
                    verdict="error",
                )  # fmt: skip
            host, port = _split_authority(url.netloc.rpartition("@")[2], 80)
            host_header = _header(headers, b"host")
            if host_header is not None:
                named, named_port = _split_authority(host_header.decode("latin-1").strip(), 80)
                if (named, named_port) != (host, port):
                    raise _Refused(
                        403, "host-mismatch",
                        f"the Host header '{host_header.decode('latin-1')}' differs from the URL's host "
                        f"{host}:{port}",
                    )  # fmt: skip
        record.host, record.port = host, port
        verdict = self.policy.decide(host, port)
        record.rule = verdict.rule
        if not verdict.allowed:
            raise _Refused(403, verdict.rule, f"{method} {host}:{port} refused: {verdict.reason}")
        upstream = await self._connect(host, port, record)
        try:
            if method == "CONNECT":
                await client.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
                first = rest
                if port == 443:  # TLS is required; other ports are checked in the splice
                    checked = await self._check_hello(client, rest, host, port, record)
                    if checked is None:
                        await upstream.aclose()
                        return None
                    first = checked
                if first:
                    await upstream.send(first)
                    record.bytes_up += len(first)
            else:
                request = _origin_form(method, target, version, headers) + rest
                await upstream.send(request)
                record.bytes_up += len(request)
        except BaseException:
            await anyio.aclose_forcefully(upstream)
            raise
        return upstream

    async def _connect(self, host: str, port: int, record: Record) -> anyio.abc.SocketStream:
        settings = self.settings
        literal = parse_address(host)
        try:
            with anyio.fail_after(settings.connect_timeout):
                addresses = [literal] if literal is not None else await self._resolve(host, port)
        except (OSError, TimeoutError) as exc:
            raise _Refused(
                502, "dns-failed", f"{host} could not be resolved on the host ({exc})", verdict="error"
            ) from None
        usable = [address for address in addresses if self.policy.address_allowed(address, port)]
        if not usable:
            shown = ", ".join(str(address) for address in addresses) or "nothing"
            first = addresses[0] if addresses else None
            example = f"[{first}]" if first is not None and first.version == 6 else str(first)
            raise _Refused(
                403, "private-address",
                f"{host} resolves to {shown}, not a public address (loopback, link-local and cloud "
                f"metadata, private, reserved); to allow it anyway, add the address itself to allow = "
                f'[...] (e.g. "{example}")',
            )  # fmt: skip
        last: Exception | None = None
        for address in usable:
            try:
                with anyio.fail_after(settings.connect_timeout):
                    stream = await anyio.connect_tcp(str(address), port)
                record.address = str(address)
                return stream
            except (OSError, TimeoutError) as exc:
                last = exc
        raise _Refused(
            502,
            "connect-failed",
            f"cannot connect to {host}:{port} ({last or 'no address'})",
            verdict="error",
        )

    async def _check_hello(
        self, client: anyio.abc.SocketStream, data: bytes, host: str, port: int, record: Record
    ) -> bytes | None:
        """The tunnel's first bytes once the ClientHello is judged; None: refused (closed)."""
        settings = self.settings
        try:
            with anyio.fail_after(settings.handshake_timeout):
                while True:
                    hello = tls.parse_client_hello(data)
                    if hello.complete or len(data) >= tls.MAX_HELLO:
                        break
                    data += await client.receive(CHUNK)
        except TimeoutError:
            record.verdict, record.rule = "denied", "handshake-timeout"
            record.reason = "no complete TLS ClientHello within the handshake timeout"
            return None
        except anyio.EndOfStream:
            return None
        if not data:
            return data
        hello = tls.parse_client_hello(data)
        if port == 443 and not (hello.complete and hello.is_tls):
            record.verdict, record.rule = "denied", "tls-required"
            record.reason = f"CONNECT {host}:443 must start with a TLS ClientHello"
            return None
        if hello.is_tls and hello.server_name is not None:
            record.sni = hello.server_name
            if hello.server_name.rstrip(".") != host:
                record.verdict, record.rule = "denied", "sni-mismatch"
                record.reason = (
                    f"the TLS server name {hello.server_name} differs from the CONNECT host {host} "
                    "(domain fronting through an allowed host is refused)"
                )
                return None
        return data

    async def _splice(
        self, client: anyio.abc.SocketStream, upstream: anyio.abc.SocketStream, record: Record, *, gate: bool
    ) -> None:
        """Bytes both ways until both ends are done or nothing moved for the idle timeout.

        `gate`: the client's first bytes, if they start a TLS handshake, pass only once the
        ClientHello's server name is checked; a server that speaks first (SSH, SMTP) is not held up.
        """
        idle = self.settings.idle_timeout
        with anyio.CancelScope(deadline=anyio.current_time() + idle) as scope:

            async def pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, up: bool) -> None:
                first = up and gate
                try:
                    while True:
                        chunk = await source.receive(CHUNK)
                        if first:
                            first = False
                            if chunk[:1] == b"\x16":
                                checked = await self._check_hello(
                                    client, chunk, record.host, record.port, record
                                )
                                if checked is None:
                                    pumps.cancel_scope.cancel()
                                    return
                                chunk = checked
                        await sink.send(chunk)
                        scope.deadline = anyio.current_time() + idle
                        if up:
                            record.bytes_up += len(chunk)
                        else:
                            record.bytes_down += len(chunk)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await sink.send_eof()

            async with anyio.create_task_group() as pumps:
                pumps.start_soon(pump, client, upstream, True)
                pumps.start_soon(pump, upstream, client, False)
        if scope.cancelled_caught:
            record.reason = f"idle for {idle:g} s"


SOCKETPAIR_BUFFER = 4 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # linux/asm-generic/socket.h; Python's socket module lacks them


def _grow_buffers(sock: socket.socket) -> None:
    """QEMU's end of the socketpair is read only when libslirp's window allows, and our end is
    refilled only when this process gets the CPU: a deeper buffer absorbs scheduling delays on a
    busy host (the default is about 200 KiB). Past net.core.wmem_max only with CAP_NET_ADMIN."""
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKETPAIR_BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKETPAIR_BUFFER)


async def _read_head(client: anyio.abc.SocketStream) -> tuple[bytes, bytes]:
    buffer = b""
    while True:
        try:
            chunk = await client.receive(MAX_HEAD + 4 - len(buffer))
        except anyio.EndOfStream:
            raise _Refused(
                400, "bad-request", "the connection ended before a complete request", verdict="error"
            ) from None
        buffer += chunk
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return buffer[: end + 4], buffer[end + 4 :]
        if len(buffer) > MAX_HEAD:
            raise _Refused(400, "bad-request", f"request head over {MAX_HEAD} bytes", verdict="error")


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise _Refused(400, "bad-request", "not an HTTP/1.x request line", verdict="error")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _Refused(400, "bad-request", "malformed header line", verdict="error")
        headers.append((name, value.strip()))
    try:
        method, target, version = (part.decode("ascii") for part in parts)
    except UnicodeDecodeError:
        raise _Refused(400, "bad-request", "non-ASCII request line", verdict="error") from None
    return method.upper(), target, version, headers


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    return next((value for key, value in headers if key.lower() == name), None)


def _origin_form(method: str, target: str, version: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request as the origin server expects it: path only, no proxy headers, one request."""
    url = urlsplit(target)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    lines = [f"{method} {path} {version}".encode()]
    if _header(headers, b"host") is None:
        lines.append(b"Host: " + url.netloc.rpartition("@")[2].encode())
    lines += [name + b": " + value for name, value in headers if name.lower() not in _HOP_HEADERS]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"
