"""virtiofsd command lines and vhost-user sockets, one per share.

The uid/gid mapping follows claude-microvm's launcher: unprivileged, virtiofsd runs in a user
namespace whose uid 0 is the invoking user (`--uid-map :0:UID:1:`), and the guest's uid 1000 is
translated to that uid 0 (`--translate-uid map:1000:0:1`): files the guest's agent writes belong to
the invoking user on the host. As root, virtiofsd refuses --uid-map, so the guest uid is translated
straight to a host uid (by default the owner of the share's directory).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Cache, SocketMode, UidMapping
from supervisor.errors import ExitCode, SupervisorError

# claude-microvm's cri-storage mapping: container storage in the guest (overlayfs, SELinux labels)
# needs trusted.* and security.* xattrs, which an unprivileged host user cannot set; store them as
# user.virtiofs.* instead.
CRI_STORAGE_XATTRMAP = ":prefix:all:trusted.:user.virtiofs.::prefix:all:security.:user.virtiofs.::ok:all:::"


@dataclass(frozen=True, kw_only=True)
class ShareIds:
    """How the guest's agent uid/gid meet the host for one share."""

    mapping: UidMapping  # resolved: never AUTO
    guest_uid: int
    guest_gid: int
    host_uid: int  # the host user files end up owned by
    host_gid: int


@dataclass(frozen=True, kw_only=True)
class ShareSpec:
    tag: str
    source: Path
    guest_path: str
    read_only: bool
    ids: ShareIds
    xattr: bool
    xattrmap: str | None
    cache: Cache
    socket_path: Path
    create: bool = False  # make the source directory (0700) if it is missing
    # Set when the source lies inside another share the guest can write: the uid the directory must
    # belong to (the user the guest's files map to there). See sharedirs.
    inside_share_of_uid: int | None = None


def mapping_args(ids: ShareIds) -> list[str]:
    if ids.mapping is UidMapping.USER_NAMESPACE:
        return [
            f"--uid-map=:0:{ids.host_uid}:1:",
            f"--gid-map=:0:{ids.host_gid}:1:",
            f"--translate-uid=map:{ids.guest_uid}:0:1",
            f"--translate-gid=map:{ids.guest_gid}:0:1",
        ]
    if ids.mapping is UidMapping.TRANSLATE:
        return [
            f"--translate-uid=map:{ids.guest_uid}:{ids.host_uid}:1",
            f"--translate-gid=map:{ids.guest_gid}:{ids.host_gid}:1",
        ]
    return []


def virtiofsd_argv(
    binary: str,
    share: ShareSpec,
    *,
    socket_mode: SocketMode,
    fd: int | None,
    sandbox: str,
    extra_args: Sequence[str],
    source_fd: int | None = None,
) -> list[str]:
    """virtiofsd's command line; with `source_fd` it exports that open directory (see sharedirs)."""
    argv = [binary]
    if socket_mode is SocketMode.FD:
        argv.append(f"--fd={fd}")
    else:
        argv.append(f"--socket-path={share.socket_path}")
    shared_dir = share.source if source_fd is None else f"/proc/self/fd/{source_fd}"
    argv += [f"--shared-dir={shared_dir}", f"--sandbox={sandbox}", f"--cache={share.cache.value}"]
    argv += mapping_args(share.ids)
    if share.xattr:
        argv.append("--xattr")
    if share.xattrmap:
        argv.append(f"--xattrmap={share.xattrmap}")
    if share.read_only:
        argv.append("--readonly")
    argv += extra_args
    return argv


def bind_vhost_user_socket(path: Path) -> socket.socket:
    """Bind and listen on the share's socket; the listening fd goes to virtiofsd with --fd.

    Binding here means the socket exists before either virtiofsd or QEMU starts: both start at
    once, QEMU's connect waits in the backlog until virtiofsd accepts, and nothing polls.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.unlink(missing_ok=True)
        sock.bind(os.fsencode(path))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise SupervisorError(
            f"cannot create the socket {path} ({exc.strerror}): the instance dir {path.parent} was "
            "changed while the VM was starting (its permissions, or removed); keep other programs out "
            "of the runtime dir, or choose another with --runtime-dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock
