"""QEMU's per-connection guestfwd command: hand the guest connection to the supervisor, then exit.

QEMU (libslirp's fork_exec) starts `PYTHON -I -S handoff.py SOCKET` for every connection the
guest opens to the proxy address, with one end of a socketpair as stdin/stdout/stderr. This
program passes that end (fd 0) to the supervisor over SOCKET (the instance's egress.sock) with
SCM_RIGHTS and exits: from then on the bytes flow between QEMU and the supervisor directly, with
no process in the middle. Standard library only, and run with -S: it must start fast.
"""

import socket
import sys


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: handoff.py SOCKET\n")
        return 2
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(sys.argv[1])
            socket.send_fds(sock, [b"c"], [0])
        except OSError:
            return 1  # the guest sees its connection closed
    return 0


if __name__ == "__main__":
    sys.exit(main())
