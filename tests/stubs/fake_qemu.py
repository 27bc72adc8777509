#!/usr/bin/python3 -IS
"""A stand-in for qemu-system-x86_64, for the fault-injection suite: fast to start, and steerable.

It reads the command line the supervisor builds and behaves like QEMU towards it: unknown options
fail at startup (exit 1, QEMU's message); it takes the status port (`-chardev socket,id=status,fd=`),
connects to every vhost-user socket (`-chardev socket,id=fsN,path=`; refused -> exit 1 like QEMU),
speaks QMP on the supervisor's private channel (`-chardev socket,id=qmp-supervisor,fd=N`):
greeting, qmp_capabilities, system_powerdown (POWERDOWN, then SHUTDOWN and exit 0), quit (SHUTDOWN,
exit 0), and exits 0 on SIGTERM as QEMU does. Once "booted" it prints GUEST-READY on its console
(stdout). On SIGUSR1 the "guest command" ends: it writes `agentvm-exit-status=$STUB_QEMU_STATUS`
to the status port and exits 0 when the kernel command line is the built-in guest's (agentvm.*), or
else (a custom kernel) exits with that status.

`STUB_QEMU` is a comma-separated list of behaviours:
  ignore-powerdown   answer system_powerdown but never power off (the supervisor must quit/kill)
  slow-powerdown     power off 0.3 s after system_powerdown
  ignore-term        ignore SIGTERM
  exit-at-once       the guest command ends as soon as it booted (as on SIGUSR1)
  flood-status       a hostile guest: write STUB_QEMU_FLOOD_MB MiB (default 128) to the status port
                     once booted, before the status,
                     then print FLOOD-DONE

`STUB_QEMU_PROBE_SLEEP=S` makes the preflight's `-version` probe take S seconds.
`STUB_ENV_LOG=FILE` appends each invocation's argv and environment to FILE.
`STUB_QEMU_STATUS_LINE` replaces the status line the guest writes (e.g. `agentvm-exit-status=256`).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from typing import NoReturn

PROG = "qemu-system-x86_64"
WITH_ARGUMENT = {
    "-name", "-machine", "-cpu", "-m", "-smp", "-object", "-numa", "-display", "-kernel",
    "-append", "-initrd", "-bios", "-chardev", "-device", "-mon", "-accel", "-serial", "-sandbox", "-netdev",
}  # fmt: skip
SWITCHES = {"-nodefaults", "-no-user-config", "-no-reboot", "-nographic", "-S"}


REAL_QEMU = "/usr/bin/qemu-system-x86_64"


def _die(message: str) -> NoReturn:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def log_environment() -> None:
    """STUB_ENV_LOG=FILE: append this process's argv and environment to FILE (secrets tests)."""
    path = os.environ.get("STUB_ENV_LOG")
    if path:
        with open(path, "ab") as log:
            log.write(repr((sys.argv, dict(os.environ))).encode() + b"\n")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _chardev(spec: str) -> tuple[str, dict[str, str]]:
    backend, _, rest = spec.partition(",")
    props: dict[str, str] = {}
    for item in rest.replace(",,", "\0").split(","):  # ",," is a comma inside a value
        key, _, value = item.replace("\0", ",").partition("=")
        if key:
            props[key] = value
    return backend, props


class Qmp:
    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.buffer = b""

    def send(self, message: dict[str, object]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(json.dumps(message).encode() + b"\r\n")

    def event(self, name: str, **data: object) -> None:
        now = time.time()
        self.send({"event": name, "data": data, "timestamp": {"seconds": int(now), "microseconds": 0}})

    def commands(self) -> list[tuple[str, object]] | None:
        """The commands that arrived, with their ids (QEMU copies one into its reply); None at EOF."""
        try:
            chunk = self.sock.recv(65536)
        except OSError:
            return None
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        found = []
        for line in lines:
            if line.strip():
                request = json.loads(line)
                found.append((str(request.get("execute", "")), request.get("id")))
        return found


def main(argv: list[str]) -> None:
    log_environment()
    if argv[1:] == ["-version"] or argv[-1] == "help":
        if argv[1:] == ["-version"] and os.environ.get("STUB_QEMU_PROBE_SLEEP"):
            time.sleep(float(os.environ["STUB_QEMU_PROBE_SLEEP"]))  # a slow preflight probe
        # The supervisor's preflight queries (version, machines, devices): the real QEMU answers.
        os.execv(REAL_QEMU, [REAL_QEMU, *argv[1:]])  # noqa: S606
    behaviours = set(filter(None, os.environ.get("STUB_QEMU", "").split(",")))
    status_value = int(os.environ.get("STUB_QEMU_STATUS", "0"))
    chardevs: list[tuple[str, dict[str, str]]] = []
    builtin_guest = False
    args = iter(argv[1:])
    for arg in args:
        if arg in SWITCHES:
            continue
        if arg not in WITH_ARGUMENT:
            _die(f"{arg}: invalid option")
        value = next(args, None)
        if value is None:
            _die(f"{arg}: requires an argument")
        if arg == "-append":
            builtin_guest = "agentvm." in str(value)
        if arg == "-chardev":
            chardevs.append(_chardev(str(value)))

    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    received: list[int] = []  # signal numbers, in order
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda signum, _frame: received.append(signum))
    if "ignore-term" in behaviours:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    status_port: int | None = None
    qmp: Qmp | None = None
    backends: list[socket.socket] = []
    for backend, props in chardevs:
        if backend == "socket" and props.get("id") == "status":
            status_port = int(props["fd"])
        elif backend == "socket" and props.get("id") == "qmp-supervisor":
            qmp = Qmp(int(props["fd"]))
        elif backend == "socket" and "path" in props:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(props["path"])
            except OSError as exc:
                _die(
                    f"-chardev socket,id={props.get('id')},path={props['path']}: Failed to connect to "
                    f"'{props['path']}': {exc.strerror}"
                )
            backends.append(sock)
    os.write(1, b"GUEST-READY\r\n")
    if "flood-status" in behaviours and status_port is not None:
        block = b"x" * 1023 + b"\n"
        for _ in range(int(os.environ.get("STUB_QEMU_FLOOD_MB", "128")) * 1024):
            _write_all(status_port, block)
        os.write(1, b"FLOOD-DONE\r\n")
    if "exit-at-once" in behaviours:
        received.append(signal.SIGUSR1)
    if qmp is not None:
        qmp.send({"QMP": {"version": {"qemu": {"major": 9, "minor": 2, "micro": 0}}, "capabilities": []}})

    power_off_at: float | None = None
    while True:
        timeout = None if power_off_at is None else max(0.0, power_off_at - time.monotonic())
        if received:
            timeout = 0.0
        watched: list[int | socket.socket] = [wake_read, *backends]
        if qmp is not None:
            watched.append(qmp.sock)
        ready, _, _ = select.select(watched, [], [], timeout)
        if power_off_at is not None and time.monotonic() >= power_off_at:
            if qmp is not None:
                qmp.event("SHUTDOWN", guest=True, reason="guest-shutdown")
            os._exit(0)
        if wake_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_read, 64)
        while received:
            if received.pop(0) == signal.SIGUSR1:  # the guest's command finished
                if builtin_guest and status_port is not None:
                    line = os.environ.get("STUB_QEMU_STATUS_LINE", f"agentvm-exit-status={status_value}")
                    _write_all(status_port, line.encode() + b"\n")
                    os._exit(0)
                os._exit(status_value)
            print(f"{PROG}: terminating on signal", file=sys.stderr, flush=True)
            os._exit(0)
        for sock in list(backends):
            if sock in ready and not sock.recv(65536):  # the backend died: QEMU lives on, I/O hangs
                print(f"{PROG}: Failed to read msg header. Read 0 of 12.", file=sys.stderr, flush=True)
                backends.remove(sock)
        if qmp is not None and qmp.sock in ready:
            commands = qmp.commands()
            if commands is None:
                qmp = None
                continue
            for command, request_id in commands:
                qmp.send({"return": {}, "id": request_id})
                if command == "quit":
                    qmp.event("SHUTDOWN", guest=False, reason="host-qmp-quit")
                    os._exit(0)
                if command == "system_powerdown":
                    qmp.event("POWERDOWN")
                    if "ignore-powerdown" not in behaviours and power_off_at is None:
                        delay = 0.3 if "slow-powerdown" in behaviours else 0.02
                        power_off_at = time.monotonic() + delay


if __name__ == "__main__":
    main(sys.argv)
