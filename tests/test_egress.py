"""The egress proxy with real sockets on 127.0.0.1: real TLS and HTTP servers, real clients in threads.

The proxy runs in the test's event loop (as in the supervisor); the clients are blocking sockets in
worker threads, so a stuck proxy shows up as a client timeout, not a hang of the loop.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.tls import TLSListener
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from supervisor import config, egress, guest, launcher, network, plan
from supervisor.config import Agent, Network, NetworkMode, Preset
from supervisor.egress import tls
from supervisor.egress.audit import Audit
from supervisor.egress.proxy import Proxy, ProxySettings
from supervisor.egress.rules import Policy, RuleError, build_policy, parse_rule
from supervisor.errors import SupervisorError
from tests.runner_fixtures import RunnerFixture, qemu_command

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for "localhost", made at test time (RSA: busybox's TLS client in the
    guest offers no ECDSA suites)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("cert")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@dataclass
class Upstream:
    port: int
    requests: list[bytes] = field(default_factory=list)  # request heads as the server saw them
    connections: int = 0


async def _answer(stream: anyio.abc.ByteStream, upstream: Upstream) -> None:
    upstream.connections += 1
    async with stream:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                head += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ssl.SSLError, OSError):
            return
        upstream.requests.append(head)
        body = b"egress-ok " + head.split(b" ")[1]
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        try:
            await stream.send(reply)
        except (anyio.BrokenResourceError, OSError):
            return


@asynccontextmanager
async def serve(tg: anyio.abc.TaskGroup, context: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    upstream = Upstream(port=listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610
    wrapped: anyio.abc.Listener[anyio.abc.ByteStream] = (
        TLSListener(listener, context, standard_compatible=False) if context else listener
    )

    async def handler(stream: anyio.abc.ByteStream) -> None:
        await _answer(stream, upstream)

    scope = anyio.CancelScope()

    async def run() -> None:
        async with wrapped:
            with scope:
                await wrapped.serve(handler)

    tg.start_soon(run)
    try:
        yield upstream
    finally:
        scope.cancel()


@asynccontextmanager
async def proxy_at(
    policy: Policy, settings: ProxySettings | None = None, audit_path: Path | None = None
) -> AsyncIterator[tuple[Proxy, int]]:
    proxy = Proxy(policy, Audit(audit_path), settings)
    multi = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    listener = multi.listeners[0]
    assert isinstance(listener, anyio.abc.SocketListener)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve_listener, listener)
        try:
            yield proxy, port
        finally:
            tg.cancel_scope.cancel()
    proxy.audit.close()


def _policy(*allow: str, deny: tuple[str, ...] = ()) -> Policy:
    return build_policy(allow=list(allow), deny=list(deny), presets=[], agent=Agent.CLAUDE)


# ---- blocking clients (run in threads) -------------------------------------------------------


def _read_response(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    return data


def _connect_tunnel(proxy_port: int, authority: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=20)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            break
        head += chunk
    return sock, head


def https_get(proxy_port: int, authority: str, cafile: Path, server_name: str) -> tuple[bytes, bytes]:
    """CONNECT, then TLS with `server_name` as SNI, then GET /: (CONNECT reply head, response)."""
    sock, head = _connect_tunnel(proxy_port, authority)
    if not head.startswith(b"HTTP/1.1 200"):
        return head, head + _read_response(sock)
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # the SNI mismatch test sends a name the certificate lacks
    try:
        with context.wrap_socket(sock, server_hostname=server_name) as tls_sock:
            tls_sock.sendall(f"GET /secure HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            return head, _read_response(tls_sock)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return head, f"TLS failed: {exc!r}".encode()


def raw_request(proxy_port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as sock:
        sock.sendall(data)
        return _read_response(sock)


# ---- the acceptance cases --------------------------------------------------------------------


async def test_connect_to_an_allowed_tls_host_gets_200_through_the_tunnel(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with anyio.create_task_group() as tg, serve(tg, context) as upstream:
        policy = _policy(f"localhost:{upstream.port}", "127.0.0.1")
        async with proxy_at(policy) as (proxy, port):
            head, response = await anyio.to_thread.run_sync(
                https_get, port, f"localhost:{upstream.port}", cert, "localhost"
            )
        tg.cancel_scope.cancel()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert response.startswith(b"HTTP/1.1 200 OK"), response
    assert response.endswith(b"egress-ok /secure")
    stats = proxy.audit.stats
    assert (stats.allowed, stats.denied, stats.active) == (1, 0, 0)
    assert stats.bytes_up > 0
    assert stats.bytes_down > len(response)  # TLS records around the plain response


async def test_a_host_not_on_the_list_gets_403_naming_the_rule_and_how_to_allow_it(tmp_path: Path) -> None:
    log = tmp_path / "egress" / "i.jsonl"
    async with proxy_at(_policy("localhost"), audit_path=log) as (proxy, port):
        reply = await anyio.to_thread.run_sync(
            raw_request, port, b"CONNECT exfil.example:443 HTTP/1.1\r\nHost: exfil.example:443\r\n\r\n"
        )
    assert reply.startswith(b"HTTP/1.1 403 Forbidden"), reply
    assert b"X-Agentvm-Egress-Rule: not-allowed" in reply
    assert b"exfil.example:443 is not on the allow-list" in reply
    assert b'add "exfil.example"' in reply and b"allow = [...]" in reply
    assert proxy.audit.stats.denied == 1
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and '"verdict":"denied"' in lines[0] and '"host":"exfil.example"' in lines[0]
    assert oct(log.stat().st_mode & 0o777) == "0o600"


async def test_deny_wins_over_allow(certificate: tuple[Path, Path]) -> None:
    async with anyio.create_task_group() as tg, serve(tg) as upstream:
        policy = _policy("localhost", "127.0.0.1", deny=(f"localhost:{upstream.port}",))
        async with proxy_at(policy) as (_proxy, port):
            reply = await anyio.to_thread.run_sync(
                raw_request, port, f"GET http://localhost:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
            )
        tg.cancel_scope.cancel()
    assert reply.startswith(b"HTTP/1.1 403"), reply
    assert f"denied by deny[0] 'localhost:{upstream.port}'".encode() in reply
    assert upstream.connections == 0


async def test_an_ip_literal_is_refused_unless_that_address_is_allowed() -> None:
    async with anyio.create_task_group() as tg, serve(tg) as upstream:
        async with proxy_at(_policy("localhost")) as (_proxy, port):
            literal = await anyio.to_thread.run_sync(
                raw_request, port, f"GET http://127.0.0.1:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
            )
            # a name that resolves to loopback, with the address not allowed: refused too
            private = await anyio.to_thread.run_sync(
                raw_request, port, f"GET http://localhost:{upstream.port}/ HTTP/1.1\r\n\r\n".encode()
            )
        async with proxy_at(_policy(f"127.0.0.1:{upstream.port}")) as (_proxy, port):
            explicit = await anyio.to_thread.run_sync(
                raw_request, port, f"GET http://127.0.0.1:{upstream.port}/x HTTP/1.1\r\n\r\n".encode()
            )
        tg.cancel_scope.cancel()
    assert literal.startswith(b"HTTP/1.1 403") and b"X-Agentvm-Egress-Rule: ip-literal" in literal, literal
    assert private.startswith(b"HTTP/1.1 403") and b"X-Agentvm-Egress-Rule: private-address" in private
    assert b'add the address itself to allow = [...] (e.g. "127.0.0.1")' in private
    assert explicit.startswith(b"HTTP/1.1 200 OK") and explicit.endswith(b"egress-ok /x")


async def test_a_client_hello_naming_another_server_closes_the_tunnel(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with anyio.create_task_group() as tg, serve(tg, context) as upstream:
        async with proxy_at(_policy("localhost", "127.0.0.1")) as (proxy, port):
            head, response = await anyio.to_thread.run_sync(
                https_get, port, f"localhost:{upstream.port}", cert, "fronted.example"
            )
        tg.cancel_scope.cancel()
    assert head.startswith(b"HTTP/1.1 200")  # the CONNECT itself was allowed
    assert response.startswith(b"TLS failed"), response  # ... and the tunnel closed on the ClientHello
    assert upstream.requests == []  # not one byte of it reached the server
    assert proxy.audit.stats.denied == 1


async def test_plain_http_to_an_allowed_host_gets_200_in_origin_form() -> None:
    async with anyio.create_task_group() as tg, serve(tg) as upstream:
        async with proxy_at(_policy("localhost", "127.0.0.1")) as (_proxy, port):
            request = (
                f"GET http://localhost:{upstream.port}/path?q=1 HTTP/1.1\r\nHost: localhost:{upstream.port}\r\n"
                "Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n\r\n"
            ).encode()
            reply = await anyio.to_thread.run_sync(raw_request, port, request)
            fronted = await anyio.to_thread.run_sync(
                raw_request,
                port,
                f"GET http://localhost:{upstream.port}/ HTTP/1.1\r\nHost: other.example\r\n\r\n".encode(),
            )
        tg.cancel_scope.cancel()
    assert reply.startswith(b"HTTP/1.1 200 OK"), reply
    assert reply.endswith(b"egress-ok /path?q=1")
    seen = upstream.requests[0]
    assert seen.startswith(b"GET /path?q=1 HTTP/1.1\r\n")
    assert b"Proxy-" not in seen and b"Connection: close" in seen
    assert fronted.startswith(b"HTTP/1.1 403") and b"host-mismatch" in fronted


@pytest.mark.parametrize("binary", [True, False], ids=["agentvm-handoff", "handoff.py"])
async def test_the_real_handoff_helper_passes_a_connection_to_the_proxy(tmp_path: Path, binary: bool) -> None:
    """What QEMU does per guest connection: run the helper with one end of a socketpair as stdin."""
    sock_path = tmp_path / "egress.sock"
    proxy = Proxy(_policy("localhost", "127.0.0.1"), Audit(None))
    async with anyio.create_task_group() as tg, serve(tg) as upstream:
        await tg.start(proxy.serve_handoff, sock_path)
        assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
        guest, qemu_end = socket.socketpair()
        with guest:
            argv = egress.handoff_argv(sock_path, binary=binary)
            result = await anyio.run_process(list(argv), stdin=qemu_end.fileno(), check=False)
            qemu_end.close()
            request = f"GET http://localhost:{upstream.port}/handed HTTP/1.1\r\n\r\n".encode()
            guest.settimeout(20)
            guest.sendall(request)
            reply = await anyio.to_thread.run_sync(_read_response, guest)
        tg.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    assert reply.endswith(b"egress-ok /handed"), reply
    assert not sock_path.exists()  # unlinked when the proxy ends


# ---- load and faults -------------------------------------------------------------------------


def _open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


async def test_500_connections_slow_clients_and_garbage_leave_it_responsive_and_leak_nothing() -> None:
    settings = ProxySettings(max_connections=256, handshake_timeout=2.0, idle_timeout=5.0)
    before = _open_fds()
    async with anyio.create_task_group() as tg, serve(tg) as upstream:
        async with proxy_at(_policy("localhost", "127.0.0.1"), settings) as (proxy, port):
            garbage = await anyio.to_thread.run_sync(raw_request, port, os.urandom(4096) + b"\r\n\r\n")
            binary = await anyio.to_thread.run_sync(raw_request, port, b"\x16\x03\x01\x00\x05hello\r\n\r\n")
            # 500 clients that connect and send nothing
            idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(500)]
            # slow clients: a byte at a time
            slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
            for sock in slow:
                sock.sendall(b"G")
            busy = await anyio.to_thread.run_sync(
                raw_request, port, b"GET http://localhost/ HTTP/1.1\r\n\r\n"
            )
            # while all that is open, a real request is still answered (the limit turned the rest away)
            request = f"GET http://localhost:{upstream.port}/alive HTTP/1.1\r\n\r\n".encode()
            await anyio.sleep(0.5)
            for sock in slow:
                sock.sendall(b"E")
            with anyio.fail_after(30):
                while proxy.audit.stats.active >= settings.max_connections:
                    await anyio.sleep(0.1)  # the idle ones time out of their handshake
                alive = await anyio.to_thread.run_sync(raw_request, port, request)
            for sock in idle + slow:
                sock.close()
            with anyio.fail_after(30):
                while proxy.audit.stats.active:
                    await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    stats = proxy.audit.stats
    assert garbage.startswith(b"HTTP/1.1 400"), garbage[:100]
    assert binary.startswith(b"HTTP/1.1 400"), binary[:100]
    assert busy.startswith(b"HTTP/1.1 503") and b"256 connections are open" in busy, busy
    assert alive.endswith(b"egress-ok /alive"), alive
    assert stats.busy > 0  # over the limit: turned away at once
    assert stats.connections == 2 + 500 + 5 + 1 + 1
    assert stats.active == 0
    assert _open_fds() <= before + 2  # nothing leaked (pytest may hold a log file or two)


async def test_a_silent_tunnel_is_closed_after_the_idle_timeout() -> None:
    async with anyio.create_task_group() as tg, serve(tg) as upstream:
        settings = ProxySettings(idle_timeout=0.5, handshake_timeout=0.5)
        async with proxy_at(_policy("localhost", "127.0.0.1"), settings) as (proxy, port):
            sock, head = await anyio.to_thread.run_sync(_connect_tunnel, port, f"localhost:{upstream.port}")
            with sock:
                rest = await anyio.to_thread.run_sync(_read_response, sock)  # returns when closed
        tg.cancel_scope.cancel()
    assert head.startswith(b"HTTP/1.1 200") and rest == b""
    assert proxy.audit.stats.active == 0


# ---- rules, TLS parsing, plan ----------------------------------------------------------------


def test_rules_wildcards_ports_and_addresses() -> None:
    policy = _policy(
        "*.example.com", "api.example.org:443", "[::1]:8080", "10.1.2.3", deny=("bad.example.com",)
    )
    assert policy.decide("a.b.example.com", 80).allowed
    assert not policy.decide("example.com", 443).allowed  # the wildcard covers subdomains only
    assert policy.decide("api.example.org", 443).allowed
    assert not policy.decide("api.example.org", 80).allowed
    assert policy.decide("::1", 8080).allowed and not policy.decide("::1", 80).allowed
    assert policy.decide("10.1.2.3", 22).allowed
    denied = policy.decide("bad.example.com", 443)
    assert not denied.allowed and denied.rule == "deny[0] bad.example.com"
    assert policy.decide("API.Example.ORG.", 443).allowed  # case and the root dot do not matter


@pytest.mark.parametrize(
    "text", ["", "*", "*.com", "exa mple.com", "host:0", "host:99999", "a:b:c", "-x.com"]
)
def test_bad_rules_are_refused_with_their_position(text: str) -> None:
    with pytest.raises(RuleError, match=r"allow\[0\]"):
        parse_rule(text, "allow[0]")


def test_presets_carry_the_agents_api_and_the_development_registries() -> None:
    policy = build_policy(allow=[], deny=[], presets=list(Preset), agent=Agent.CLAUDE)
    assert policy.decide("api.anthropic.com", 443).rule == "preset claude api.anthropic.com"
    assert policy.decide("registry.npmjs.org", 443).allowed and policy.decide("pypi.org", 443).allowed
    assert not policy.decide("api.openai.com", 443).allowed
    gemini = build_policy(allow=[], deny=[], presets=[Preset.AGENT], agent=Agent.GEMINI)
    assert gemini.decide("generativelanguage.googleapis.com", 443).allowed
    assert not gemini.decide("pypi.org", 443).allowed


def _client_hello(server_name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls_object.do_handshake()
    return outgoing.read()


def test_the_server_name_is_read_from_a_real_client_hello_in_any_split() -> None:
    hello = _client_hello("api.anthropic.com")
    for cut in (1, 4, 5, 40, len(hello) - 1):
        assert not tls.parse_client_hello(hello[:cut]).complete
    parsed = tls.parse_client_hello(hello)
    assert parsed.complete and parsed.is_tls and parsed.server_name == "api.anthropic.com"
    assert not tls.parse_client_hello(b"GET / HTTP/1.1\r\n").is_tls
    assert not tls.parse_client_hello(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00").is_tls  # a ServerHello


def _plan(mode: NetworkMode | None, *, forwards: int = 0, agent_guest: bool = False) -> egress.NetworkPlan:
    return egress.plan_network(
        Network(mode=mode, allow=["example.com"]),
        agent=Agent.CLAUDE,
        agent_guest=agent_guest,
        runner=False,
        instance="i-1",
        instance_dir=Path("/run/user/1/agentvm/i-1"),
        forwards=forwards,
        env={"HOME": "/home/u"},
    )


def test_modes_defaults_and_the_qemu_netdev_they_give() -> None:
    assert _plan(None).mode is NetworkMode.OPEN
    assert _plan(None, agent_guest=True).mode is NetworkMode.ALLOWLIST
    assert network.plan_network([], builtin_guest=True, egress=_plan(NetworkMode.NONE).netdev_extra()) is None
    allow = _plan(NetworkMode.ALLOWLIST)
    forward = launcher.parse_forwards(["8080:80"])
    nic = network.plan_network(forward, builtin_guest=False, egress=allow.netdev_extra())
    assert nic is not None
    netdev = nic.qemu_args("pci")[1].split(",")
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:8080-:80" in netdev
    assert (
        netdev[-1]
        == f"guestfwd=tcp:10.0.2.100:3128-cmd:{egress.HANDOFF_BINARY} /run/user/1/agentvm/i-1/egress.sock"
    )
    assert allow.guest_env()["HTTPS_PROXY"] == "http://10.0.2.100:3128"
    assert allow.log_path == Path("/home/u/.local/state/agentvm-supervise/egress/i-1.jsonl")
    with pytest.raises(SupervisorError, match="no network device"):
        _plan(NetworkMode.NONE, forwards=1)


def test_doctor_row_runs_the_handoff_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    assert egress.check_egress(_plan(NetworkMode.ALLOWLIST)).status.value == "ok"  # install.sh built it
    # without the C helper (no compiler at install): the Python one works, slower: a warning
    monkeypatch.setattr(egress, "HANDOFF_BINARY", Path("/nonexistent/agentvm-handoff"))
    row = egress.check_egress(_plan(NetworkMode.ALLOWLIST))
    assert row.status.value == "warn" and "handoff.py" in row.summary
    assert egress.check_egress(_plan(NetworkMode.OPEN)).status.value == "skip"
    spaced = egress.plan_network(
        Network(mode=NetworkMode.ALLOWLIST),
        agent=Agent.CLAUDE,
        agent_guest=False,
        runner=False,
        instance="i",
        instance_dir=Path("/tmp/with space/i"),
        forwards=0,
        env={},
    )
    row = egress.check_egress(spaced)
    assert row.status.value == "fail" and "space or comma" in row.summary


def test_a_runner_with_another_way_out_is_refused_in_allowlist_mode(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    """A tap next to the user netdev would go around the proxy: the plan says so, naming it."""
    fixture = RunnerFixture(tmp_path / "runner")
    argv = qemu_command(guest_assets, guest_command=None)
    argv += ["-netdev", "tap,id=tap0,ifname=vm0", "-device", "virtio-net-device,netdev=tap0"]
    fixture.write(argv)
    work = tmp_path / "proj"
    work.mkdir()
    document = {
        "runner": {"script": str(fixture.script)},
        "work-dir": str(work),
        "runtime-dir": "/tmp/avr-plan-only",
        "network": {"mode": "allowlist"},
    }
    with pytest.raises(SupervisorError, match=r"cannot cover \(tap\).*exactly one -netdev user"):
        plan.build_plan(
            config.load(None, document), env={"HOME": str(tmp_path / "home")}, cwd=tmp_path, command=None
        )


async def test_an_unwritable_log_dir_leaves_the_proxy_working(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the log's directory should be: mkdir fails
    async with proxy_at(_policy("localhost"), audit_path=blocker / "egress" / "i.jsonl") as (proxy, port):
        reply = await anyio.to_thread.run_sync(raw_request, port, b"GET http://x.example/ HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403") and proxy.audit.stats.denied == 1
    assert proxy.audit.path is None
