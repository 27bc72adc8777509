"""The QMP client against a real socket whose QEMU end is already gone."""

from __future__ import annotations

import socket

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
