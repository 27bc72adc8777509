"""Egress proxy vs open user-mode NAT, same run: a download's throughput and a request's latency.

    .venv/bin/python bench/egress.py [--mib 100] [--requests 50] [--rounds 2]

A host HTTP server on 127.0.0.1 serves /big (MIB MiB from memory) and /small. The real built-in
guest fetches them with busybox wget: in `open` mode straight from 10.0.2.2 (slirp NAT), in
`allowlist` mode from localhost through the egress proxy (guestfwd -> handoff -> the supervisor's
event loop -> the server). Throughput is timed by the server (first byte to last byte written);
latency as the server sees it: the guest fetches /small in a loop (busybox's date has no
sub-second clock), and the gaps between consecutive arrivals are one request each (wget's start,
connect, request, answer); their difference between the modes is what the proxy adds, the
per-connection handoff included. Rounds alternate the two modes.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    payload: ClassVar[bytes] = b""
    transfers: ClassVar[list[float]] = []
    arrivals: ClassVar[list[float]] = []

    def do_GET(self) -> None:
        if self.path == "/small":
            self.arrivals.append(time.monotonic())
        body = self.payload if self.path == "/big" else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        started = time.monotonic()
        view = memoryview(body)
        for offset in range(0, len(body), 1 << 20):
            self.wfile.write(view[offset : offset + (1 << 20)])
        self.wfile.flush()
        if self.path == "/big":
            self.transfers.append(time.monotonic() - started)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _run_guest(mode: str, port: int, requests: int, root: Path) -> None:
    base = f"http://localhost:{port}" if mode == "allowlist" else f"http://10.0.2.2:{port}"
    config = root / f"{mode}.toml"
    config.write_text(
        f'[network]\nmode = "{mode}"\npresets = []\nallow = ["localhost:{port}", "127.0.0.1"]\n'
    )
    script = (
        "unset no_proxy NO_PROXY; "
        f"wget -q -O /dev/null {base}/big || echo DOWNLOAD-FAILED; "
        f"i=0; while [ $i -lt {requests} ]; do wget -q -O /dev/null {base}/small; i=$((i+1)); done"
    )
    work = root / f"work-{mode}"
    work.mkdir(exist_ok=True)
    env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "HOME": str(root / "home")}
    argv = [
        sys.executable, "-m", "supervisor", "run", "--config", str(config), "--work-dir", str(work),
        "--runtime-dir", str(root / "rt"), "--name", f"bench-egress-{mode}", "--", "sh", "-c", script,
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    if done.returncode != 0 or "DOWNLOAD-FAILED" in done.stdout:
        raise SystemExit(
            f"bench: the {mode} guest failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-1500:]}"
        )


def flood(root: Path, connections: int) -> None:
    """A guest opens `connections` idle connections to the proxy (and a few that send a byte a
    second); meanwhile the host asks `status` over the control socket, the way the CLI does."""
    from supervisor import control  # the repo's, as the supervisor under test
    from supervisor.runtime import InstanceDir

    work = root / "work-flood"
    work.mkdir(exist_ok=True)
    script = (
        f"i=0; while [ $i -lt {connections} ]; do (sleep 90 | nc 10.0.2.100 3128 >/dev/null 2>&1) & "
        "i=$((i+1)); done; "
        "for j in 1 2 3 4 5; do (while :; do printf x; sleep 1; done | nc 10.0.2.100 3128 >/dev/null 2>&1) & "
        "done; "
        "touch /work/flood-up; while [ ! -e /work/go ]; do sleep 0.2; done"
    )
    env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "HOME": str(root / "home")}
    argv = [
        sys.executable, "-m", "supervisor", "run", "-v", "--network", "allowlist", "--work-dir", str(work),
        "--runtime-dir", str(root / "rt"), "--name", "bench-flood", "--", "sh", "-c", script,
    ]  # fmt: skip
    with (root / "flood.log").open("wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 600
        while not (work / "flood-up").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        [instance] = (root / "rt").iterdir()
        times: list[float] = []
        active, peak, steady_since = 0, 0, time.monotonic()
        # ask every 0.2 s while the guest's connections pile up, until their number holds for 10 s
        while time.monotonic() - steady_since < 10 and time.monotonic() < deadline:
            started = time.monotonic()
            status = control.call(InstanceDir(instance).control_socket, control.StatusRequest())
            times.append((time.monotonic() - started) * 1000)
            active = status.egress.active if status.egress is not None else 0
            if active > peak:
                peak, steady_since = active, time.monotonic()
            time.sleep(0.2)
        (work / "go").touch()
        go = time.monotonic()
        proc.wait(timeout=120)
        ended = time.monotonic() - go
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            print((root / "flood.log").read_text()[-3000:])
    print(f"status while the guest opened up to {peak} proxy connections at once (limit 256: 503 beyond):")
    print(
        f"  p50 {_pct(times, 0.5):.1f} ms, max {max(times):.1f} ms over {len(times)} calls (target: 100 ms)"
    )
    print(f"  from the guest's last step to the supervisor's exit: {ended:.1f} s (power-off included)")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flood", type=int, default=0, metavar="N", help="only: status under N connections")
    args = parser.parse_args()
    if args.flood:
        with tempfile.TemporaryDirectory(prefix="bench-egress-") as tmp:
            flood(Path(tmp), args.flood)
        return 0
    _Handler.payload = os.urandom(1 << 20) * args.mib
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    seconds: dict[str, list[float]] = {"open": [], "allowlist": []}
    latency: dict[str, list[float]] = {"open": [], "allowlist": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-egress-") as tmp:
            for _ in range(args.rounds):
                for mode in ("open", "allowlist"):
                    before, arrived = len(_Handler.transfers), len(_Handler.arrivals)
                    _run_guest(mode, port, args.requests, Path(tmp))
                    seconds[mode] += _Handler.transfers[before:]
                    times = _Handler.arrivals[arrived:]
                    latency[mode] += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    finally:
        server.shutdown()
        server.server_close()
    rate = {mode: args.mib / statistics.median(values) for mode, values in seconds.items()}
    print(f"download of {args.mib} MiB, median of {args.rounds} (server-timed):")
    for mode in ("open", "allowlist"):
        print(f"  {mode:<9} {rate[mode]:7.1f} MiB/s")
    print(f"  proxy / open NAT: {rate['allowlist'] / rate['open']:.2f}x (target >= 0.8x)")
    print(f"one request from the guest (busybox wget of 2 bytes, {len(latency['open'])} per mode):")
    for mode in ("open", "allowlist"):
        values = latency[mode]
        print(f"  {mode:<9} p50 {_pct(values, 0.5):6.1f} ms   p99 {_pct(values, 0.99):6.1f} ms")
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        added = _pct(latency["allowlist"], q) - _pct(latency["open"], q)
        print(f"  added by the proxy, {name}: {added:+.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
