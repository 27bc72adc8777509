"""The real guest: exec -> the guest's marker line, through agentvm-supervise and by hand.

"By hand" starts the very command lines the supervisor would (built by its own modules: plan,
virtiofsd_argv, qemu_argv; the same sockets bound and passed with --fd, the same PTY console), from
this already-running Python process, with nothing around them: the lower bound for that boot.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench.core import CACHE, Bench
from supervisor import config, plan
from supervisor.qemu import qemu_argv
from supervisor.virtiofsd import bind_vhost_user_socket, virtiofsd_argv

MARKER = b"BENCH-42"
COMMAND = ["sh", "-c", "echo BENCH-$((6*7))"]  # the marker is not in the kernel command line


def _dirs(bench: Bench, name: str) -> tuple[Path, Path, Path]:
    base = bench.root / "guest" / name
    work, home, runtime = base / "work", base / "home", base / "rt"
    work.mkdir(parents=True)
    return work, home, runtime


def _read_until(fd: int, marker: bytes, deadline: float, proc: subprocess.Popen[bytes]) -> None:
    seen = b""
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"bench: {marker!r} not seen; output: {seen[-500:]!r}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk and proc.poll() is not None:
                raise RuntimeError(f"bench: exited ({proc.returncode}) before {marker!r}: {seen[-500:]!r}")
            seen += chunk


def through_supervisor(bench: Bench, index: int, command: list[str] = COMMAND) -> float:
    work, home, runtime = _dirs(bench, f"sup-{index}")
    argv = [
        *bench.supervise, "run", "--name", "bench-guest", "--work-dir", str(work),
        "--agent-home", str(home), "--runtime-dir", str(runtime), "--accel", "tcg", "--", *command,
    ]  # fmt: skip
    started = time.monotonic_ns()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "AGENTVM_SUPERVISE_CACHE": str(CACHE)},
    )
    assert proc.stdout is not None
    try:
        _read_until(proc.stdout.fileno(), MARKER, time.monotonic() + 180, proc)
        seen = time.monotonic_ns()
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return (seen - started) / 1e6


def by_hand(bench: Bench, index: int) -> float:
    work, home, runtime = _dirs(bench, f"hand-{index}")
    cfg = config.load(
        None,
        {"work-dir": str(work), "agent-home": str(home), "runtime-dir": str(runtime), "name": "bench-hand"},
    )
    checked = plan.build_plan(
        cfg,
        env={**os.environ, "AGENTVM_SUPERVISE_CACHE": str(CACHE)},
        cwd=work,
        command=COMMAND,
        terminal_size=None,
    )
    for share in checked.shares:  # the default shares create these (agent-home, cri-storage)
        share.source.mkdir(parents=True, exist_ok=True)
    started = time.monotonic_ns()
    runtime.mkdir(mode=0o700, exist_ok=True)
    checked.instance_dir.mkdir(mode=0o700)
    shares: list[subprocess.Popen[bytes]] = []
    qemu: subprocess.Popen[bytes] | None = None
    master, slave = os.openpty()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for share in checked.shares:
            listener = bind_vhost_user_socket(share.socket_path)
            argv = virtiofsd_argv(
                checked.virtiofsd_binary,
                share,
                socket_mode=checked.socket_mode,
                fd=listener.fileno(),
                sandbox=checked.sandbox,
                extra_args=checked.virtiofsd_extra_args,
            )
            shares.append(_start(argv, pass_fds=(listener.fileno(),)))
            listener.close()
        public = bind_vhost_user_socket(checked.qmp_socket)
        # The guest's status port: read by nobody here (the guest powering off is all we wait for).
        status_ours, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = checked.qemu_spec(
            private_qmp_fd=theirs.fileno(), public_qmp_fd=public.fileno(), status_fd=status_theirs.fileno()
        )
        qemu = _start(
            qemu_argv(spec), pass_fds=(theirs.fileno(), public.fileno(), status_theirs.fileno()), tty=slave
        )
        status_theirs.close()
        status_ours.close()
        os.close(slave)
        slave = -1
        theirs.close()
        public.close()
        _read_until(master, MARKER, time.monotonic() + 180, qemu)
        seen = time.monotonic_ns()
        deadline = time.monotonic() + 60
        while qemu.poll() is None and time.monotonic() < deadline:  # the guest powers off
            with contextlib.suppress(OSError):
                if select.select([master], [], [], 0.2)[0]:
                    os.read(master, 65536)
    finally:
        for proc in [*shares, *([qemu] if qemu else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        ours.close()
        shutil.rmtree(checked.instance_dir, ignore_errors=True)
    return (seen - started) / 1e6


def _start(argv: list[str], *, pass_fds: tuple[int, ...], tty: int | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=tty if tty is not None else subprocess.DEVNULL,
        stdout=tty if tty is not None else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=pass_fds,
        start_new_session=True,
    )
