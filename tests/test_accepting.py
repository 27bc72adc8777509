"""accepting.serve_each with real sockets: out of file descriptors (EMFILE), the server warns,
backs off and keeps serving; the connection waiting in the backlog is served once an fd is free."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import REPO

SERVER = textwrap.dedent(
    """
    import os, resource, sys
    import anyio, structlog
    from supervisor import accepting

    structlog.configure(processors=[structlog.processors.JSONRenderer()],
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    path = sys.argv[1]

    async def main():
        listener = await anyio.create_unix_listener(path)
        fillers = []

        async def handle(stream):
            async with stream:
                await stream.send(b"served\\n")
            raise SystemExit(0)

        async def starve_then_free():
            # use up every fd, tell the parent, and free one after the server has failed to accept
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            try:
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            print("starved", flush=True)
            await anyio.sleep(1.0)
            os.close(fillers.pop())

        async with anyio.create_task_group() as group:
            await group.start(lambda task_status: accepting.serve_each(
                listener, handle, log=structlog.get_logger(), what="test", task_status=task_status))
            group.start_soon(starve_then_free)

    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    anyio.run(main)
    """
)


def test_an_accept_out_of_fds_backs_off_and_serves_once_one_is_free(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "starved\n", server.stderr.read() if server.stderr else ""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(30)
            client.connect(str(path))  # into the backlog: the server cannot accept it yet
            assert client.recv(64) == b"served\n"
        _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 0, stderr
    assert '"event": "test accept failed"' in stderr and "Too many open files" in stderr, stderr
