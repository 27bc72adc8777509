"""Share source directories, found and opened so that no link a guest could have planted is followed.

A guest writes into its shares as the host user: a symlink it leaves in the agent home (say
`cri-storage -> /home/USER`) looks exactly like one the user made. If the host followed it on the next
start, virtiofsd would export the link's target read-write to the guest: an escape. So:

- planning (`physical_source`) turns each share's path into one with no symlink in it. A symlink as
  the source itself is refused; symlinks in its parents are followed only outside every other share
  of the plan (the user's own paths, like ~/src -> /data/src), never at or below one;
- at start (`open_source`) every component of that path is opened with O_NOFOLLOW, missing ones are
  made with mkdirat and given to their owner with fchown on the opened fd, so a link swapped in
  after planning makes the open fail instead of being followed (no mkdir-then-chown race);
- virtiofsd gets the opened directory itself (`--shared-dir=/proc/self/fd/N`), not a path to look
  up again, so nothing can be swapped in between our check and its open either;
- a share inside another share must belong to the user the guest's files map to.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from supervisor.errors import ExitCode, SupervisorError

# As many symlinks as the kernel follows in one lookup (MAXSYMLINKS).
_MAX_LINKS = 40


def is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def physical_source(tag: str, raw: Path, guarded: Sequence[Path]) -> Path:
    """`raw` (absolute, lexically normal) as a path with no symlink in it.

    Symlinks in the parents are followed unless they lie at or below one of `guarded` (the other
    shares' sources: what a guest can write); the source itself must not be a symlink.
    """
    if raw.is_symlink():
        target = os.path.realpath(raw)
        raise SupervisorError(
            f"share '{tag}': its source {raw} is a symbolic link (to {target}). Share sources are "
            "never followed through links, since a guest can plant one in a directory it shares "
            f"(and so reach {target}): give the directory itself ({target}) if that is really "
            "what you want to share, or remove the link",
            exit_code=ExitCode.NO_INPUT,
        )
    resolved = Path("/")
    pending = list(reversed(raw.parts[1:]))
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / name
        if not candidate.is_symlink():
            resolved = candidate
            continue
        inside = next((root for root in guarded if is_within(candidate, root)), None)
        if inside is not None:
            raise SupervisorError(
                f"share '{tag}': the path of its source {raw} goes through {candidate}, a symbolic link "
                f"inside the share directory {inside}, which the guest can write: the guest may have "
                "planted it, so it is not followed. Remove the link, or point the share at a "
                "directory outside the other shares",
                exit_code=ExitCode.NO_INPUT,
            )
        links += 1
        if links > _MAX_LINKS:
            raise SupervisorError(
                f"share '{tag}': too many levels of symbolic links in {raw}: fix the links or give "
                "the directory's real path",
                exit_code=ExitCode.NO_INPUT,
            )
        link = candidate.readlink()
        if link.is_absolute():
            resolved = Path("/")
        pending.extend(reversed(link.parts[1:] if link.is_absolute() else link.parts))
    return resolved


def open_source(
    tag: str, source: Path, *, create: bool, owner: tuple[int, int] | None, expect_uid: int | None
) -> int:
    """Open `source` (from `physical_source`) without following any link; the caller closes the fd.

    `create`: make missing directories (0700), the last one given to `owner` (as root). `expect_uid`:
    refuse the directory unless it belongs to this uid (or to us).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        walked = Path("/")
        for index, name in enumerate(source.parts[1:]):
            walked /= name
            last = index == len(source.parts) - 2
            try:
                child = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise _missing(tag, walked) from None
                child = _make_dir(tag, walked, fd, name, owner if last else None)
            except OSError as exc:
                raise _unopenable(tag, walked, exc) from None
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if expect_uid is not None and info.st_uid not in (expect_uid, os.geteuid()):
            raise SupervisorError(
                f"share '{tag}': its source {source} lies inside another share and belongs to uid "
                f"{info.st_uid}, not to uid {expect_uid} whose files the guest writes there; a "
                "directory the guest could not have made is not shared from inside another share. "
                "Move it out of the other share, or fix its owner",
                exit_code=ExitCode.NO_INPUT,
            )
        return fd
    except BaseException:
        os.close(fd)
        raise


def _make_dir(tag: str, path: Path, parent_fd: int, name: str, owner: tuple[int, int] | None) -> int:
    try:
        with contextlib.suppress(FileExistsError):  # made by a concurrent start: opened below
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unopenable(tag, path, exc) from None
        raise SupervisorError(
            f"cannot create the directory {path} for share '{tag}' ({exc.strerror}): create it "
            "yourself or choose another path",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    if owner is None or os.geteuid() != 0:
        return fd
    try:
        os.fchown(fd, *owner)  # the fd, not the name: a link swapped in now changes nothing
    except OSError as exc:
        os.close(fd)
        raise SupervisorError(
            f"cannot give the new directory {path} of share '{tag}' to uid {owner[0]} "
            f"({exc.strerror}): create it yourself with that owner",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    return fd


def _missing(tag: str, path: Path) -> SupervisorError:
    return SupervisorError(
        f"share '{tag}': the directory {path} does not exist (it was removed after the start was "
        "planned?): create it, or point the share at an existing directory",
        exit_code=ExitCode.NO_INPUT,
    )


def _unopenable(tag: str, path: Path, exc: OSError) -> SupervisorError:
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            return SupervisorError(
                f"share '{tag}': {path} became a symbolic link (to {path.readlink()}) after the "
                "start was planned; links are not followed in share paths, since a guest can plant "
                "one: remove the link and start again",
                exit_code=ExitCode.NO_INPUT,
            )
    return SupervisorError(
        f"share '{tag}': cannot open the directory {path} ({exc.strerror}): make it a directory "
        "this user can read, or point the share elsewhere",
        exit_code=ExitCode.NO_INPUT,
    )
