"""Serving a listener: every connection a task of one group, and an accept that fails for want of
fds or memory (EMFILE, ENFILE, ENOMEM) backs off and retries instead of ending the server, and with
it the instance's task group. Used by the control socket and the egress proxy's TCP listener."""

from __future__ import annotations

import errno
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

ACCEPT_BACKOFF = 0.1  # seconds: long enough for a connection to close and free an fd
# out of fds or memory, or a client that left before we took it: the listener itself is fine
TRANSIENT = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
)


async def serve_each(
    listener: anyio.abc.SocketListener,
    handle: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]],
    *,
    log: Any,
    what: str,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on `listener` until cancelled; `handle` runs per connection in this call's task
    group, so cancelling the server cancels its connections. `what` names the listener in a
    failed accept's warning."""
    async with listener, anyio.create_task_group() as connections:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                # anyio wraps the accept's OSError in BrokenResourceError; one without an
                # OSError behind it is a listener that is gone, not a shortage to wait out
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in TRANSIENT:
                    raise
                log.warning(f"{what} accept failed", reason=str(cause))
                await anyio.sleep(ACCEPT_BACKOFF)
                continue
            connections.start_soon(handle, stream)
