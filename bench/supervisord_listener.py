"""supervisord event listener for the bench (microvm.nix's supervisord-event-handler, in spirit):
counts PROCESS_STATE_RUNNING events of the virtiofsd-* programs and, when all of them are
RUNNING, writes "ready" to the FIFO named by argv[2] (microvm.nix: systemd-notify --ready).

usage: supervisord_listener.py COUNT READY_FIFO
"""

from __future__ import annotations

import sys


def main() -> None:
    expected, ready = int(sys.argv[1]), sys.argv[2]
    running: set[str] = set()
    notified = False
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        header = dict(token.split(":", 1) for token in line.split())
        payload = sys.stdin.read(int(header["len"]))
        if header.get("eventname") == "PROCESS_STATE_RUNNING":
            fields = dict(token.split(":", 1) for token in payload.split())
            if fields.get("processname", "").startswith("virtiofsd-"):
                running.add(fields["processname"])
        if not notified and len(running) >= expected:
            with open(ready, "w") as fifo:  # noqa: PTH123 - a FIFO, written once
                fifo.write("ready\n")
            notified = True
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
