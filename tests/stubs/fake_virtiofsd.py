#!/usr/bin/python3 -IS
"""A stand-in for virtiofsd, for the fault-injection suite: fast to start, and steerable.

Like the real one it takes `--fd=N` (a listening socket handed over) or `--socket-path=P` (creates
and listens on P), refuses a missing `--shared-dir`, forks a "sandbox" child that does the serving
under `--sandbox=namespace` (so the supervisor has a two-process group to kill), serves exactly one
front-end connection and exits 0 when that front-end disconnects. Unknown flags are errors.

`STUB_VIRTIOFSD` steers one share, named by the last component of its shared dir:
`tag=behaviour[,tag=behaviour...]` with the behaviours
  exit-early    print an error and exit 1 before accepting (virtiofsd dying before QEMU connects)
  exit-after-listen   the same, but after creating its --socket-path socket (it looked ready)
  slow-listen   bind the --socket-path socket, then wait 0.3 s before listen() (connects are refused)
  slow-socket   wait 0.3 s before creating the --socket-path socket
  no-socket     never create the --socket-path socket (hangs until killed)
  ignore-term   ignore SIGTERM, so only the supervisor's SIGKILL ends it
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import NoReturn

KNOWN_FLAGS = (
    "--fd=",
    "--socket-path=",
    "--shared-dir=",
    "--sandbox=",
    "--cache=",
    "--uid-map=",
    "--gid-map=",
    "--translate-uid=",
    "--translate-gid=",
    "--xattrmap=",
)
KNOWN_SWITCHES = ("--xattr", "--readonly")


def _fail(message: str) -> NoReturn:
    print(f"[fake virtiofsd] error: {message}", file=sys.stderr, flush=True)
    os._exit(1)


def _behaviour(shared_dir: str) -> str:
    # The supervisor passes the opened directory (/proc/self/fd/N): its name is the link's target's.
    tag = os.path.basename(os.path.realpath(shared_dir).rstrip("/"))
    for item in os.environ.get("STUB_VIRTIOFSD", "").split(","):
        name, _, value = item.partition("=")
        if name == tag:
            return value
    return ""


def _serve(listener: socket.socket) -> None:
    """Accept one front-end and read until it disconnects."""
    conn, _ = listener.accept()
    listener.close()
    while conn.recv(65536):
        pass
    os._exit(0)


def main(argv: list[str]) -> None:
    log = os.environ.get("STUB_ENV_LOG")
    if log:  # the secrets tests: this process's environment
        with open(log, "ab") as out:
            out.write(repr((argv, dict(os.environ))).encode() + b"\n")
    # The supervisor's preflight asks for the version and which flags exist, as of the real one.
    if argv[1:] == ["--version"]:
        print("virtiofsd 1.13.2 (stub)")
        return
    if argv[1:] == ["--help"]:
        print(
            "Usage: virtiofsd [OPTIONS]\n"
            + "\n".join(f"  {flag.rstrip('=')}" for flag in KNOWN_FLAGS + KNOWN_SWITCHES)
        )
        return
    options: dict[str, str] = {}
    for arg in argv[1:]:
        if arg in KNOWN_SWITCHES:
            continue
        prefix = next((flag for flag in KNOWN_FLAGS if arg.startswith(flag)), None)
        if prefix is None:
            _fail(f"unexpected argument '{arg}' found")
        options[prefix] = arg[len(prefix) :]
    shared_dir = options.get("--shared-dir=", "")
    if not shared_dir:
        _fail("the following required arguments were not provided: --shared-dir <SHARED_DIR>")
    if not os.path.isdir(shared_dir):
        _fail(f"shared directory {shared_dir} does not exist: No such file or directory (os error 2)")
    behaviour = _behaviour(shared_dir)
    if behaviour == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if behaviour == "exit-early":
        _fail(f"failed to set up the sandbox for {shared_dir} (injected by STUB_VIRTIOFSD)")
    if "--fd=" in options:
        listener = socket.socket(fileno=int(options["--fd="]))
    elif "--socket-path=" in options:
        if behaviour == "slow-socket":
            time.sleep(0.3)
        if behaviour == "no-socket":
            while True:
                signal.pause()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(options["--socket-path="])
        if behaviour == "slow-listen":
            time.sleep(0.3)
        listener.listen(1)
        if behaviour == "exit-after-listen":
            _fail(f"lost {shared_dir} right after listening (injected by STUB_VIRTIOFSD)")
    else:
        _fail("either --fd or --socket-path is required")
    if options.get("--sandbox=", "namespace") != "namespace":
        _serve(listener)
    child = os.fork()
    if child == 0:
        _serve(listener)
    listener.close()
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


if __name__ == "__main__":
    main(sys.argv)
