"""The egress allow-list from inside the real built-in guest: busybox wget/nc through the proxy.

Host servers on 127.0.0.1 (plain HTTP and TLS with a certificate made at test time) stand in for the
internet; the config allows `localhost` on their ports and the address 127.0.0.1 explicitly (names
that resolve to loopback are refused otherwise).
"""

from __future__ import annotations

import http.server
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor import guest
from tests.runner_fixtures import RunnerFixture, qemu_command
from tests.support import base_env, leftovers, supervisor_argv, wait_until_gone
from tests.test_egress import certificate  # noqa: F401 - the fixture

pytestmark = pytest.mark.vm

# nc -e runs this with stdin and stdout connected to the proxy: CONNECT, skip the reply's head,
# then TLS with SNI $SNI through the tunnel; what came back goes to /work/tls-$SNI
TLS_GET = r"""#!/bin/sh
exec 3<&0 4>&1 >/dev/null
printf 'CONNECT localhost:%s HTTP/1.1\r\n\r\n' "$PORT" >&4
read -r status <&3
cr=$(printf '\r')
while read -r line <&3 && [ "$line" != "$cr" ] && [ -n "$line" ]; do :; done
printf 'GET /tls HTTP/1.0\r\nHost: localhost\r\n\r\n' | ssl_client -s 3 -n "$SNI" >/work/tls-body 2>&1
echo "CONNECT $status; $(cat /work/tls-body)" >"/work/tls-$SNI"
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"host-ok {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(context: ssl.SSLContext | None) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture
def host_servers(certificate: tuple[Path, Path]) -> Iterator[tuple[int, int]]:  # noqa: F811
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    # busybox's ssl_client speaks TLS 1.2 and signs with SHA-1 only: OpenSSL's level 0 lets it
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    plain, plain_port = _serve(None)
    secure, secure_port = _serve(context)
    try:
        yield plain_port, secure_port
    finally:
        for server in (plain, secure):
            server.shutdown()
            server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_from_the_guest_only_the_proxy_leads_out(
    guest_assets: guest.GuestAssets,
    host_servers: tuple[int, int],
    tmp_path: Path,
    short_runtime: Path,
) -> None:
    plain, secure = host_servers
    forward = _free_port()
    config = tmp_path / "agentvm.toml"
    config.write_text(
        "[network]\n"
        'mode = "allowlist"\n'
        "presets = []\n"
        f'allow = ["localhost:{plain}", "localhost:{secure}", "127.0.0.1"]\n'
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "index.html").write_text("served through the forward\n")
    # busybox wget sends `GET https://...` to a proxy (no CONNECT): a CONNECT and busybox's own TLS
    # client (ssl_client, which wget uses) over nc -e instead
    tls_get = work / "tls-get"
    tls_get.write_text(TLS_GET)
    tls_get.chmod(0o755)
    # no_proxy= : the rules name "localhost", which the guest's NO_PROXY would keep local
    script = f"""
unset no_proxy NO_PROXY
echo "proxy=$HTTPS_PROXY"
httpd -p 8080 -h /work
echo "plain: $(wget -q -O - http://localhost:{plain}/plain 2>&1)"
PORT={secure} SNI=localhost nc 10.0.2.100 3128 -e /work/tls-get
echo "tls: $(cat /work/tls-localhost)"
PORT={secure} SNI=fronted.example nc 10.0.2.100 3128 -e /work/tls-get
echo "sni-mismatch: $(cat /work/tls-fronted.example)"
echo "denied: $(wget -q -S -O - http://denied.example/ 2>&1 | grep -q 'HTTP/1.1 403' && echo 403)"
echo "literal: $(printf 'CONNECT [::1]:{secure} HTTP/1.1\\r\\n\\r\\n' | nc 10.0.2.100 3128 | head -1)"
echo "direct-host: $(nc -w 3 10.0.2.2 {plain} </dev/null >/dev/null 2>&1 && echo connected || echo failed)"
echo "direct-other: $(nc -w 3 1.1.1.1 80 </dev/null >/dev/null 2>&1 && echo connected || echo failed)"
echo "dns: $(timeout 5 nslookup example.com 10.0.2.3 >/dev/null 2>&1 && echo answered || echo none)"
# a tunnel still open when the VM ends must not hold up the teardown
(printf 'CONNECT localhost:{plain} HTTP/1.1\r\n\r\n'; sleep 600) | nc 10.0.2.100 3128 >/dev/null &
touch /work/guest-ready
i=0; while [ ! -e /work/host-done ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
"""
    env = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [*supervisor_argv(), "run", "--config", str(config), "--work-dir", str(work),
         "--runtime-dir", str(short_runtime), "--name", "egress-e2e", "--forward", f"{forward}:8080",
         "--", "sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=base_env(env),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (work / "guest-ready").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{forward}/index.html", timeout=10) as answer:
            forwarded = answer.read()
        status = subprocess.run(
            [*supervisor_argv(), "status", "egress-e2e", "--runtime-dir", str(short_runtime), "--json"],
            capture_output=True, text=True, env=base_env(env), timeout=30, check=False,
        )  # fmt: skip
        (work / "host-done").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode(errors="replace")
    stderr = err.decode(errors="replace")
    print(text, stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, stderr[-2000:]
    assert "proxy=http://10.0.2.100:3128" in text
    assert "plain: host-ok /plain" in text
    assert "tls: CONNECT HTTP/1.1 200 Connection established\r;" in text and "host-ok /tls" in text
    assert "denied: 403" in text
    assert "sni-mismatch: CONNECT HTTP/1.1 200 Connection established\r;" in text
    assert "host-ok" not in text.split("sni-mismatch:")[1].split("\n")[0]
    assert "literal: HTTP/1.1 403" in text
    assert "direct-host: failed" in text and "direct-other: failed" in text
    assert "dns: none" in text
    assert forwarded == b"served through the forward\n"
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["egress"]
    assert counts["allowed"] == 2 and counts["denied"] == 3 and counts["active"] == 1, (
        counts
    )  # the open tunnel
    assert "denied.example:80 (1)" in counts["top_denied"]
    assert wait_until_gone("egress-e2e") == []
    assert leftovers(short_runtime) == []
    [log] = (tmp_path / "state" / "agentvm-supervise" / "egress").glob("egress-e2e*.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {(r["host"], r["verdict"]) for r in records} >= {
        ("localhost", "allowed"),
        ("denied.example", "denied"),
        ("::1", "denied"),
    }


def test_a_microvm_nix_runner_in_allowlist_mode_gets_the_proxy_and_nothing_else(
    guest_assets: guest.GuestAssets,
    host_servers: tuple[int, int],
    tmp_path: Path,
    short_runtime: Path,
) -> None:
    """The runner's own -netdev user is restricted and given the proxy's guestfwd; the proxy
    variables reach its guest through .microvm-env (the runner fixture boots the built-in guest's
    kernel; agentvm.net= in qemu.cmdline sets its eth0 up, as a NixOS guest does itself)."""
    plain, _secure = host_servers
    script = (
        "unset no_proxy NO_PROXY; "
        f'echo "via-proxy: $(wget -q -O - http://localhost:{plain}/runner 2>&1)"; '
        f'echo "direct: $(nc -w 3 10.0.2.2 {plain} </dev/null >/dev/null 2>&1 && echo connected || echo failed)"'
    )
    fixture = RunnerFixture(tmp_path / "runner")
    fixture.write(qemu_command(guest_assets, guest_command=["sh", "-c", script]))
    config = tmp_path / "agentvm.toml"
    config.write_text(
        f'[network]\nmode = "allowlist"\npresets = []\nallow = ["localhost:{plain}", "127.0.0.1"]\n'
        '[qemu]\ncmdline = "agentvm.net=10.0.2.15/24,10.0.2.2,10.0.2.3"\n'
    )
    work = tmp_path / "proj"
    work.mkdir()
    env = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state"), "WORK_DIR": str(work)}
    done = subprocess.run(
        [*supervisor_argv(), "run", "--config", str(config), "--runner", str(fixture.script),
         "--runtime-dir", str(short_runtime), "--accel", "tcg"],
        capture_output=True, text=True, env=base_env(env), timeout=300, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "via-proxy: host-ok /runner" in done.stdout, done.stdout[-2000:]
    assert "direct: failed" in done.stdout
    [home] = (tmp_path / "home" / ".local" / "share" / "claude-microvm").iterdir()
    assert "HTTPS_PROXY='http://10.0.2.100:3128'" in (home / ".microvm-env").read_text()
    assert leftovers(short_runtime) == []
