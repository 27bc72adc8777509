"""Facts the preflight learns by running things, kept so that a second start runs nothing.

What a binary answers to `-version`, `-device help` or `--help` depends only on the binary: the
answers are stored in the state dir ($XDG_STATE_HOME/agentvm-supervise/facts) under the binary's
identity (path, device, inode, size, mtime and ctime: a new build or an upgrade is a new file, and
ctime cannot be set back by hand). Whether virtiofsd's sandbox can unshare its namespaces depends
on the kernel and on this process's place in it: that success is kept per boot, and only where the
key covers everything that decides it (no seccomp filter, which the key could not tell apart).

Only successes are stored, so a failure is always probed afresh, and a cache that cannot be read
or written (another user's dir, a full disk) only costs the probes. `doctor` reads the cache but
never writes it (it creates nothing); `run` writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import msgspec

from supervisor import children, xdg

T = TypeVar("T")
_VERSION = 1  # of what is stored: a change makes every stored fact unknown


class _Answer(msgspec.Struct, frozen=True, array_like=True):
    status: int
    output: str


# What _load decodes (cli.main prepares msgspec's decoders for it while the stop signals are held)
DECODED_TYPES = (list[_Answer],)


def facts_dir(env: Mapping[str, str]) -> Path:
    return xdg.base("XDG_STATE_HOME", env) / xdg.APP / "facts"


class Facts:
    def __init__(self, directory: Path | None, *, store: bool) -> None:
        """`directory` None: no cache (every probe runs); `store`: keep what was learnt."""
        self.directory = directory
        self.store = store

    # ---- binaries ----------------------------------------------------------------------------

    def probe(self, path: str, queries: Sequence[Sequence[str]]) -> list[children.ProbeResult]:
        """`path` run with each of `queries` (argv after the binary), from the cache when this
        very binary answered them before, else run in parallel (and stored if all succeeded)."""
        key = self._binary_key(path, queries)
        cached = self._load(key, list[_Answer]) if key else None
        if cached is not None and len(cached) == len(queries):
            return [children.ProbeResult(answer.status, answer.output) for answer in cached]
        results = children.probe_many([[path, *query] for query in queries])
        if key and all(result.status == 0 for result in results):
            self._save(key, [_Answer(result.status or 0, result.output) for result in results])
        return results

    @staticmethod
    def _binary_key(path: str, queries: Sequence[Sequence[str]]) -> str | None:
        try:
            info = Path(path).stat()
        except OSError:
            return None
        identity = (path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        return "bin-" + _digest(repr((_VERSION, identity, [list(q) for q in queries])))

    # ---- namespaces ----------------------------------------------------------------------------

    def namespaces_known_to_work(self, flags: int) -> tuple[bool, str | None]:
        """(whether unshare(flags) worked before in this boot for a process like this one, the key
        to remember a success under; None where a success cannot be kept soundly)."""
        key = _namespace_key(flags)
        if key is None:
            return False, None
        return self._load(key, bool) is True, key

    def remember(self, key: str | None) -> None:
        if key is not None:
            self._save(key, True)

    # ---- storage -----------------------------------------------------------------------------

    def _usable_dir(self, *, create: bool) -> Path | None:
        """The cache dir if it is ours and private (others could plant answers in it), else None."""
        directory = self.directory
        if directory is None:
            return None
        if create:
            with contextlib.suppress(OSError):
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            info = os.lstat(directory)
        except OSError:
            return None
        private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022
        return directory if private else None

    def _load(self, key: str, kind: type[T]) -> T | None:
        directory = self._usable_dir(create=False)
        if directory is None:
            return None
        try:
            fd = os.open(directory / key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            with os.fdopen(fd, "rb") as file:
                return msgspec.json.decode(file.read(), type=kind)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def _save(self, key: str, value: object) -> None:
        if not self.store:
            return
        directory = self._usable_dir(create=True)
        if directory is None:
            return
        temporary = directory / f".{key}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            fd = os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(msgspec.json.encode(value))
                temporary.replace(directory / key)  # atomic: a reader sees all of it or nothing
            finally:
                with contextlib.suppress(FileNotFoundError):
                    temporary.unlink()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _read(path: str) -> str:
    try:
        with open(path, "rb") as file:  # noqa: PTH123 - /proc files, read once
            return file.read().decode(errors="replace").strip()
    except OSError:
        return "-"


def _namespace_key(flags: int) -> str | None:
    """What decides whether unshare(flags) works for this process, or None when it cannot be known
    from outside: a seccomp filter (a container's default profile refuses unshare) could be any."""
    status = dict(line.split(":", 1) for line in _read("/proc/self/status").splitlines() if ":" in line)
    if status.get("Seccomp", "").strip() != "0":
        return None
    try:
        user_ns = Path("/proc/self/ns/user").stat().st_ino
    except OSError:
        return None
    parts = (
        _VERSION,
        flags,
        _read("/proc/sys/kernel/random/boot_id"),
        os.geteuid(),
        os.getegid(),
        user_ns,
        status.get("CapEff", "").strip(),
        status.get("NoNewPrivs", "").strip(),
        _read("/proc/self/attr/current"),  # the LSM (AppArmor) profile
        _read("/proc/sys/kernel/unprivileged_userns_clone"),
        _read("/proc/sys/user/max_user_namespaces"),
        _read("/proc/sys/user/max_mnt_namespaces"),
        _read("/proc/sys/user/max_pid_namespaces"),
        _read("/proc/sys/user/max_net_namespaces"),
        _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    )
    return "ns-" + _digest(repr(parts))
