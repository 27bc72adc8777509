"""sd_notify: readiness and status for systemd units and `podman run --sdnotify=container`.

When NOTIFY_SOCKET names an AF_UNIX datagram socket (a path, or an abstract name written with a
leading '@'), the supervisor sends `STATUS=…` as it goes, `READY=1` once the runner is up (QEMU
answered on QMP), and `STOPPING=1` when teardown begins. Notification is best effort, as in
libsystemd: a missing or full socket is logged once and never stops the VM.

A start may wait long before READY=1 (for the KVM device, for the guest's first build) and a stop
with a long deadline may outlast TimeoutStopSec: `EXTEND_TIMEOUT_USEC` keeps systemd from killing
either (`extending` while a blocking step runs; the stop path's budget with STOPPING=1).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from supervisor.config import Timeouts

ENV = "NOTIFY_SOCKET"
EXTEND_EVERY = 10.0  # seconds between EXTEND_TIMEOUT_USEC while a blocking step runs
STOP_MARGIN = 5.0  # seconds on top of the stop path's own deadlines


def take_address(env: MutableMapping[str, str]) -> str | None:
    """Read NOTIFY_SOCKET and remove it, like sd_notify(unset_environment=1): our children (QEMU,
    virtiofsd) must not be able to declare the service ready on our behalf."""
    return env.pop(ENV, None) or None


class Notifier:
    """Sends sd_notify datagrams to one address; does nothing when the address is None."""

    def __init__(self, address: str | None) -> None:
        self._log = structlog.get_logger().bind(notify_socket=address)
        self._target: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._failed = False
        self._ready = False
        self._stopping = False
        if not address:
            return
        if address.startswith("@"):
            self._target = b"\0" + os.fsencode(address[1:])  # Linux abstract namespace
        elif address.startswith("/"):
            self._target = address
        else:
            self._log.warning(
                "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@name); not notifying"
            )
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls, env: MutableMapping[str, str]) -> Notifier:
        return cls(take_address(env))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str) -> None:
        """One datagram of KEY=value lines, e.g. send(READY="1", STATUS="running")."""
        if self._sock is None or self._target is None:
            return
        payload = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        try:
            self._sock.sendto(payload.encode("utf-8", "replace"), self._target)
        except OSError as exc:
            if not self._failed:  # once: a dead listener should not flood the logs
                self._failed = True
                self._log.warning("cannot notify the service manager", reason=exc.strerror or str(exc))

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def ready(self, text: str) -> None:
        if not self._ready:
            self._ready = True
            self.send(READY="1", STATUS=text)

    def stopping(self, text: str, *, budget: float | None = None) -> None:
        """STOPPING=1; with `budget`, also give the stop that many seconds from now."""
        if not self._stopping:
            self._stopping = True
            if budget is None:
                self.send(STOPPING="1", STATUS=text)
            else:
                self.send(STOPPING="1", STATUS=text, EXTEND_TIMEOUT_USEC=_usec(budget))

    def extend_timeout(self, seconds: float) -> None:
        """The current start/stop may take `seconds` more from now (systemd >= 236)."""
        self.send(EXTEND_TIMEOUT_USEC=_usec(seconds))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@contextlib.contextmanager
def extending(notifier: Notifier, status: str, *, every: float = EXTEND_EVERY) -> Iterator[None]:
    """While the block runs (a blocking step before READY=1: waiting for KVM, building the guest),
    say so in STATUS= and extend the start timeout every `every` s, with `2 * every` of slack.

    A thread, because the step blocks this one; it is joined on the way out, so the watchdog's fork
    after the plan still happens while there are no threads.
    """
    if not notifier.enabled:
        yield
        return
    notifier.send(STATUS=status, EXTEND_TIMEOUT_USEC=_usec(2 * every))
    done = threading.Event()

    def keep_extending() -> None:
        while not done.wait(every):
            notifier.extend_timeout(2 * every)

    thread = threading.Thread(target=keep_extending, name="sd-notify-extend", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def stop_budget(timeouts: Timeouts, deadline: float | None = None) -> float:
    """Seconds the whole stop path may take: the power-off deadline (a `stop --deadline`, else
    timeouts.graceful-stop), QMP quit, TERM-grace-KILL of the runner and of the virtiofsd group,
    and a margin."""
    graceful = deadline if deadline is not None else timeouts.graceful_stop
    return graceful + timeouts.quit + 2 * timeouts.kill_grace + STOP_MARGIN


def _usec(seconds: float) -> str:
    return str(max(1, round(seconds * 1_000_000)))


def _one_line(value: str) -> str:
    return value.replace("\n", " ")
