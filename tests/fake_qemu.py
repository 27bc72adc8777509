"""A stand-in runner for tests that need a running instance but not a guest: it takes QEMU's command
line, speaks just enough QMP on the supervisor's channel (greeting, capabilities, system_powerdown,
quit) and prints RUNNER-UP on its console. It starts in milliseconds, so the control-socket and
PID-1 tests do not boot a VM each.

FAKE_QEMU_ORPHAN=SECONDS: first double-fork a grandchild that is orphaned at once, lives SECONDS
with "agentvm-orphan" in its command line, then exits with status 3.
"""

from __future__ import annotations

import json
import os
import socket
import sys

REAL_QEMU = "/usr/bin/qemu-system-x86_64"


def _qmp_fd(argv: list[str]) -> int:
    for arg in argv:
        if arg.startswith("socket,id=qmp-supervisor,fd="):
            return int(arg.rsplit("=", 1)[1])
    raise SystemExit("fake-qemu: no -chardev socket,id=qmp-supervisor,fd=N")


def _orphan(seconds: float) -> None:
    middle = os.fork()
    if middle == 0:
        if os.fork() == 0:
            os.execvp("sh", ["sh", "-c", f"sleep {seconds}; exit 3", "agentvm-orphan"])  # noqa: S606
        os._exit(0)  # the grandchild is now an orphan: the nearest subreaper adopts it
    os.waitpid(middle, 0)


def main() -> None:
    if sys.argv[1:] == ["-version"] or sys.argv[-1] == "help":
        # The preflight's queries (version, machines, devices, the sandbox, ...): the real QEMU answers.
        os.execv(REAL_QEMU, [REAL_QEMU, *sys.argv[1:]])  # noqa: S606
    if "FAKE_QEMU_ORPHAN" in os.environ:
        _orphan(float(os.environ["FAKE_QEMU_ORPHAN"]))
    qmp = socket.socket(fileno=_qmp_fd(sys.argv))
    reader = qmp.makefile("rb")

    def send(message: dict[str, object]) -> None:
        qmp.sendall(json.dumps(message).encode() + b"\n")

    send({"QMP": {"version": {}, "capabilities": []}})
    sys.stdout.write("RUNNER-UP\r\n")
    sys.stdout.flush()
    for line in reader:
        request = json.loads(line)
        command = request.get("execute")
        send({"return": {}, "id": request.get("id")})  # QEMU copies the request's id into its reply
        if command == "system_powerdown":
            send({"event": "POWERDOWN", "data": {}})
            send({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}})
            return
        if command == "quit":
            return


if __name__ == "__main__":
    main()
