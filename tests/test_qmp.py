"""The QMP client against a real socket whose QEMU end is already gone."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator

import anyio
import pytest

from supervisor.qmp import QmpClient, QmpError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_qemu_gone_before_the_handshake_ends_the_client_quietly() -> None:
    """Regression: QEMU exiting at once (a bad flag) made the handshake's send raise
    BrokenResourceError out of the VM's task group: an internal error instead of QEMU's message."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    events: list[str] = []
    client = QmpClient(ours, lambda event, _data: events.append(event))
    with anyio.fail_after(10):
        await client.run()
    assert client.closed.is_set() and events == []
    with pytest.raises(QmpError, match="closed"):
        await client.execute("system_powerdown")


@contextlib.contextmanager
def _real_qemu() -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """A real QEMU with no machine, its QMP monitor on one end of a socketpair (as vm.py does)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-name", "qmp-ids", "-nodefaults", "-display", "none",
         "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    try:
        yield proc, ours
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


async def test_a_cancelled_commands_reply_does_not_reach_the_next_command() -> None:
    """Regression (issue 11): replies were matched by order, so a command cancelled after it was sent
    (a move_on_after deadline) left its reply queued and the next command received it."""
    with _real_qemu() as (proc, sock):
        client = QmpClient(sock, lambda _event, _data: None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            with anyio.fail_after(20):
                await client.ready.wait()
                # QEMU stopped: it takes the command off the socket only once it runs again, so the
                # deadline cancels the execute between its send and the reply, every time.
                os.kill(proc.pid, signal.SIGSTOP)
                with anyio.move_on_after(0.3) as scope:
                    await client.execute("query-status")
                assert scope.cancelled_caught
                os.kill(proc.pid, signal.SIGCONT)
                assert await client.execute("query-name") == {"name": "qmp-ids"}
                assert "running" in await client.execute("query-status")
                await client.execute("quit")
            await client.closed.wait()
