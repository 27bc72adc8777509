"""Who is on the other end of a Unix socket, and whether they may drive this instance.

The instance dir is 0700 and its sockets 0600, so only its owner (and root) can connect; the
check here is the second wall, for a runtime dir someone loosened. Used by console.sock,
control.sock and the egress proxy's egress.sock alike, so they cannot disagree about who is allowed.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int

    @property
    def allowed(self) -> bool:
        """The instance's own user, or root."""
        return self.uid in (0, os.geteuid())


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Peer(pid=pid, uid=uid)
