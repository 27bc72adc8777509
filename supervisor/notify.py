"""sd_notify: readiness and status for systemd units and `podman run --sdnotify=container`.

When NOTIFY_SOCKET names an AF_UNIX datagram socket (a path, or an abstract name written with a
leading '@'), the supervisor sends `STATUS=…` as it goes, `READY=1` once the runner is up (QEMU
answered on QMP), and `STOPPING=1` when teardown begins. Notification is best effort, as in
libsystemd: a missing or full socket is logged once and never stops the VM.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping

import structlog

ENV = "NOTIFY_SOCKET"


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

    def stopping(self, text: str) -> None:
        if not self._stopping:
            self._stopping = True
            self.send(STOPPING="1", STATUS=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(value: str) -> str:
    return value.replace("\n", " ")
