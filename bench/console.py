"""Console proxy figures: bulk output throughput and added keystroke latency, against peers measured
in the same run on the same machine.

    .venv/bin/python bench/console.py [--mib N] [--keys N]

Throughput: a writer process pours N MiB of text into a PTY, and this process drains the "user's
terminal" PTY until every byte arrived. Two payloads: `colored` (a test runner's output: an escape
sequence every ~17 bytes, UTF-8 box drawing) and `plain` (a build log). Ways, one peer each:
  * copy loop   writer -> console PTY -> a minimal read/write loop -> terminal PTY: the direct PTY
                copy, what any proxy between a PTY and a terminal costs at least (the same two PTY
                hops, nothing else). The ratios and the target are against it.
  * agentvm     writer -> console PTY -> supervisor.console.hub.Console (hostile-output filter, replay
                buffer, console log, terminal-mode tracking) -> terminal PTY; filter on (the
                default) and off.
  * agentvm attach   writer -> console PTY -> Console -> console.sock -> `agentvm-supervise
                attach` (supervisor.console.attach) -> terminal PTY: the console seen from another pane,
                one hop (and one process) more than the others; no target, shown to keep it honest.
  * no proxy    the writer writes straight into the terminal PTY: one PTY hop instead of two, a
                floor no proxy reaches (shown for scale).
Latency: a byte typed into the terminal travels to an echo process on the guest side and back;
the round trip is timed for each key: with no proxy (echo on the terminal PTY itself), through the
copy loop, through the Console and through an attach. "Added" is agentvm's percentile minus no
proxy's.
Targets (issue 3): agentvm >= 0.9x the copy loop's throughput, <= 1 ms p99 added latency.

`main()` returns the figures as a dict (for a bench runner); run as a script it prints a table.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# ---- the processes the bench starts (this file, run with --role) ------------------------------


def _role_writer(fd: int, path: str) -> None:
    data = Path(path).read_bytes()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:65536]) :]


def _role_echo(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        os.write(fd, data)


def _role_copy(guest_master: int, terminal: int) -> None:
    """The minimal proxy: both directions, select, read, write, nothing else."""
    while True:
        readable, _, _ = select.select([guest_master, terminal], [], [])
        for fd in readable:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            target = terminal if fd == guest_master else guest_master
            view = memoryview(data)
            while view:
                view = view[os.write(target, view) :]


def _role_console(guest_master: int, terminal: int, filter_on: bool, log_dir: str, socket_path: str) -> None:
    """The Console on `terminal` (its stdin and stdout); with `socket_path`, also serving console.sock."""
    import anyio

    from supervisor import logs
    from supervisor.console.hub import Console, bind_console_socket
    from supervisor.console.log import open_log
    from supervisor.console.settings import ConsoleSettings
    from supervisor.console.terminal import ConsolePty

    logs.configure(level=logging.WARNING)  # to stderr, as the CLI does: stdout is the terminal

    settings = ConsoleSettings(filter=filter_on, log_dir=Path(log_dir))
    log = open_log(Path(log_dir), "bench-0000", max_bytes=settings.log_max_bytes, keep=2)
    os.set_blocking(guest_master, False)
    console = Console(
        ConsolePty(guest_master, -1),
        instance="bench-0000",
        settings=settings,
        size=None,
        on_stop=lambda: None,
        log=log,
    )
    listener = bind_console_socket(Path(socket_path)) if socket_path else None
    anyio.run(lambda: console.run(stdin_fd=terminal, stdout_fd=terminal, listener=listener))


def _role_attach(socket_path: str) -> None:
    """`agentvm-supervise attach` on this process's terminal (stdin and stdout)."""
    import anyio

    from supervisor import logs
    from supervisor.console.attach import attach
    from supervisor.errors import SupervisorError

    logs.configure(level=logging.WARNING)
    deadline = time.monotonic() + 10
    while True:  # the socket is bound a moment before the console listens on it
        try:
            anyio.run(lambda: attach("bench-0000", Path(socket_path), stdin=0, stdout=1, escape=None))
            return
        except SupervisorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _spawn(
    role: str, *args: str | int, pass_fds: Sequence[int] = (), stdio: int | None = None
) -> subprocess.Popen[bytes]:
    """This file in another process, playing `role`; `stdio` becomes its stdin and stdout."""
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *map(str, args)],
        pass_fds=tuple(pass_fds),
        stdin=stdio if stdio is not None else subprocess.DEVNULL,
        stdout=stdio if stdio is not None else subprocess.DEVNULL,
        start_new_session=True,
    )


# ---- the measurements --------------------------------------------------------------------------


def _payload(kind: str, mib: int) -> bytes:
    """`colored`: a test runner's output, an escape sequence every ~17 bytes and box drawing;
    `plain`: a build log, ASCII lines."""
    if kind == "colored":
        line = (
            "\x1b[1;34m│\x1b[0m \x1b[32mok\x1b[0m  src/module_{:05d}.py  "
            "\x1b[2m── 12 tests, 0.{:03d} s ──\x1b[0m the quick brown fox \x1b[33m⚠\x1b[0m\r\n"
        )
    else:
        line = "[{:05d}] cc -O2 -c src/module_{:03d}.c -o build/module.o  # the quick brown fox\r\n"
    chunk = "".join(line.format(index, index % 1000) for index in range(2000)).encode()
    return (chunk * (mib * 2**20 // len(chunk) + 1))[: mib * 2**20]


def _raw_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave


def _drain(master: int, total: int) -> None:
    got = 0
    while got < total:
        select.select([master], [], [])
        got += len(os.read(master, 1 << 20))


class _Topology:
    """The user's terminal PTY, and (except with no proxy) a guest PTY with a proxy between them."""

    def __init__(self, proxy: str, *, filter_on: bool = True, log_dir: str = "") -> None:
        self.terminal_master, self.terminal_slave = _raw_pty()
        self.proxy: subprocess.Popen[bytes] | None = None
        self.console: subprocess.Popen[bytes] | None = None  # behind the attach
        self._console_terminal = -1
        self.guest_master = self.guest_slave = -1
        if proxy == "none":
            return
        self.guest_master, self.guest_slave = _raw_pty()
        if proxy == "copy":
            self.proxy = _spawn(
                "copy",
                self.guest_master,
                self.terminal_slave,
                pass_fds=(self.guest_master, self.terminal_slave),
            )
        elif proxy == "console":  # the Console holds the terminal as its stdin and stdout
            self.proxy = _spawn(
                "console", self.guest_master, 0, int(filter_on), log_dir, "",
                pass_fds=(self.guest_master,), stdio=self.terminal_slave,
            )  # fmt: skip
        else:  # attach: the Console on a terminal of its own, the user's terminal attached to it
            self._console_terminal, console_terminal_slave = _raw_pty()
            socket_path = str(Path(log_dir) / "console.sock")
            Path(socket_path).unlink(missing_ok=True)  # the last attach run's
            self.console = _spawn(
                "console", self.guest_master, 0, int(filter_on), log_dir, socket_path,
                pass_fds=(self.guest_master,), stdio=console_terminal_slave,
            )  # fmt: skip
            os.close(console_terminal_slave)
            self.proxy = _spawn("attach", socket_path, stdio=self.terminal_slave)
        os.close(self.guest_master)
        time.sleep(0.5)  # let the proxy start and attach (outside every timed region)

    @property
    def writer_end(self) -> int:
        """Where the guest writes: the guest PTY, or the terminal itself with no proxy."""
        return self.guest_slave if self.guest_slave >= 0 else self.terminal_slave

    def close(self) -> None:
        for fd in (self.guest_slave, self.terminal_slave):
            if fd >= 0:
                os.close(fd)
        for process in (self.console, self.proxy):
            if process is not None:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for fd in (self._console_terminal, self.terminal_master):
            if fd >= 0:
                os.close(fd)


def _throughput(topology: _Topology, payload_path: str, size: int) -> float:
    start = time.perf_counter()
    writer = _spawn("writer", 1, payload_path, stdio=topology.writer_end)
    _drain(topology.terminal_master, size)
    elapsed = time.perf_counter() - start
    writer.wait()
    return size / elapsed / 1e6


def _round_trips(topology: _Topology, keys: int) -> list[float]:
    echo = _spawn("echo", 0, stdio=topology.writer_end)
    time.sleep(0.3)
    master = topology.terminal_master
    times = []
    for index in range(keys + 50):
        key = b"abcdefghijklmnopqrstuvwxyz"[index % 26 : index % 26 + 1]
        start = time.perf_counter()
        os.write(master, key)
        got = b""
        while not got.endswith(key):  # its own echo, not a late one of an earlier key
            select.select([master], [], [])
            got += os.read(master, 64)
        if index >= 50:  # warm-up keys are not counted
            times.append(time.perf_counter() - start)
        time.sleep(0.0005)
    echo.kill()
    echo.wait()
    return times


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


WAYS = ("copy loop", "agentvm", "agentvm, filter off", "agentvm attach", "no proxy")
PEER = "copy loop"


def _topology(way: str, log_dir: str) -> _Topology:
    if way == "no proxy":
        return _Topology("none")
    if way == "agentvm attach":
        return _Topology("attach", log_dir=log_dir)
    if way == "copy loop":
        return _Topology("copy")
    return _Topology("console", filter_on=way == "agentvm", log_dir=log_dir)


def main(argv: Sequence[str] = ()) -> dict[str, Any]:
    """Measure. `argv`: this script's flags (none: the defaults). Returns
    {"throughput_mb_s": {payload: {way: MB/s}}, "throughput_ratio": {payload: {way: x vs the copy
    loop}}, "latency_us": {way: {"p50", "p99"}}, "added_latency_us": {"p50", "p99"}}."""
    parser = argparse.ArgumentParser(description="Console proxy throughput and keystroke latency.")
    parser.add_argument("--mib", type=int, default=32, help="MiB of output per throughput run (default 32)")
    parser.add_argument("--keys", type=int, default=1000, help="keystrokes per latency run (default 1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per way; the median counts")
    args = parser.parse_args(argv)
    from supervisor.console.filter import FAST_SCAN

    figures: dict[str, Any] = {
        "mib": args.mib,
        "keys": args.keys,
        "filter_scanner": "C (supervisor/console/_scan.c)"
        if FAST_SCAN
        else "regex (supervisor.console._scan not built)",
        "throughput_mb_s": {},
        "latency_us": {},
    }
    with tempfile.TemporaryDirectory(prefix="agentvm-bench-") as tmp:
        for kind in ("colored", "plain"):
            payload = _payload(kind, args.mib)
            path = str(Path(tmp) / kind)
            Path(path).write_bytes(payload)
            runs: dict[str, list[float]] = {way: [] for way in WAYS}
            for _ in range(args.repeat):  # interleaved, so a change of load hits every way alike
                for way in WAYS:
                    topology = _topology(way, tmp)
                    try:
                        runs[way].append(_throughput(topology, path, len(payload)))
                    finally:
                        topology.close()
            figures["throughput_mb_s"][kind] = {
                way: statistics.median(values) for way, values in runs.items()
            }
        # A p99 is one slow key in a hundred, which a neighbour's burst of work can make: each way
        # runs `repeat` times, interleaved, and the median run's percentiles count.
        latency_ways = ("no proxy", "copy loop", "agentvm", "agentvm attach")
        samples: dict[str, list[tuple[float, float]]] = {way: [] for way in latency_ways}
        for _ in range(args.repeat):
            for way in latency_ways:
                topology = _topology(way, tmp)
                try:
                    times = _round_trips(topology, args.keys)
                finally:
                    topology.close()
                samples[way].append((_percentile(times, 0.5) * 1e6, _percentile(times, 0.99) * 1e6))
        for way, latencies in samples.items():
            figures["latency_us"][way] = {
                "p50": statistics.median(p50 for p50, _ in latencies),
                "p99": statistics.median(p99 for _, p99 in latencies),
            }
    figures["throughput_ratio"] = {
        kind: {way: value / ways[PEER] for way, value in ways.items()}
        for kind, ways in figures["throughput_mb_s"].items()
    }
    latency = figures["latency_us"]
    figures["added_latency_us"] = {
        key: latency["agentvm"][key] - latency["no proxy"][key] for key in ("p50", "p99")
    }
    return figures


def _print(figures: dict[str, Any]) -> None:
    print(
        f"console throughput, {figures['mib']} MiB per run, median of runs; "
        f"filter fast path: {figures['filter_scanner']}"
    )
    print(f"  {'payload':<9}{'way':<22}{'MB/s':>9}{'vs copy loop':>14}")
    for kind, ways in figures["throughput_mb_s"].items():
        for way, value in ways.items():
            ratio = figures["throughput_ratio"][kind][way]
            print(f"  {kind:<9}{way:<22}{value:>9.1f}{ratio:>13.2f}x")
    print(f"keystroke round trip, {figures['keys']} keys")
    print(f"  {'way':<31}{'p50 us':>9}{'p99 us':>11}")
    for way, value in figures["latency_us"].items():
        print(f"  {way:<31}{value['p50']:>9.0f}{value['p99']:>11.0f}")
    added = figures["added_latency_us"]
    print(f"  {'added by agentvm':<31}{added['p50']:>9.0f}{added['p99']:>11.0f}")
    ratios = figures["throughput_ratio"]
    worst = min(ratios[kind]["agentvm"] for kind in ratios)
    met = {True: "met", False: "NOT met"}
    print(
        f"targets: throughput >= 0.90x the copy loop: {worst:.2f}x at worst, {met[worst >= 0.9]}; "
        f"added p99 <= 1000 us: {added['p99']:.0f} us, {met[added['p99'] <= 1000]}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, rest = sys.argv[2], sys.argv[3:]
        if role == "writer":
            _role_writer(int(rest[0]), rest[1])
        elif role == "echo":
            _role_echo(int(rest[0]))
        elif role == "copy":
            _role_copy(int(rest[0]), int(rest[1]))
        elif role == "console":
            _role_console(int(rest[0]), int(rest[1]), rest[2] == "1", rest[3], rest[4])
        elif role == "attach":
            _role_attach(rest[0])
        sys.exit(0)
    _print(main(sys.argv[1:]))
