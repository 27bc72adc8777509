"""The built-in guest: its assets (kernel, initramfs, virtiofsd), its command line, its status.

Assets are built on first use by guest/build-assets.sh (Debian packages, downloaded and unpacked,
nothing installed) into CACHE/guest-HASH, where HASH covers every file in guest/ (the build script,
the guest's /init, what the build copies in), so a change to any of them rebuilds and an unchanged
cache is reused as it is.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from supervisor import xdg
from supervisor.errors import ExitCode, SupervisorError
from supervisor.launcher import child_environment

ASSET_FILES = ("vmlinuz", "initrd.gz", "virtiofsd")
KERNEL_CMDLINE_MAX = 2047  # x86 COMMAND_LINE_SIZE is 2048 including the NUL


@dataclass(frozen=True)
class GuestAssets:
    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.gz"

    @property
    def virtiofsd(self) -> Path:
        return self.directory / "virtiofsd"


def _guest_sources() -> dict[str, bytes]:
    folder = resources.files("supervisor") / "guest"
    return {item.name: item.read_bytes() for item in folder.iterdir() if item.name.endswith(".sh")}


def assets_hash() -> str:
    digest = hashlib.sha256()
    for name, content in sorted(_guest_sources().items()):
        digest.update(name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()[:16]


def cache_root(env: Mapping[str, str]) -> Path:
    if env.get("AGENTVM_SUPERVISE_CACHE"):
        return Path(env["AGENTVM_SUPERVISE_CACHE"])
    return xdg.base("XDG_CACHE_HOME", env) / xdg.APP


def cached_assets(env: Mapping[str, str]) -> GuestAssets | None:
    """The assets if they are built already; never builds."""
    assets = GuestAssets(cache_root(env) / f"guest-{assets_hash()}")
    return assets if all((assets.directory / name).exists() for name in ASSET_FILES) else None


def asset_versions(assets: GuestAssets) -> dict[str, str]:
    """VERSIONS, as build-assets.sh wrote it: kernel, busybox, virtiofsd, ... (empty if unreadable)."""
    try:
        text = (assets.directory / "VERSIONS").read_text()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def ensure_assets(env: Mapping[str, str]) -> GuestAssets:
    """Return the cached assets, building them first (with progress on stderr) if missing."""
    root = cache_root(env)
    assets = GuestAssets(root / f"guest-{assets_hash()}")
    if all((assets.directory / name).exists() for name in ASSET_FILES):
        return assets
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = os.open(root / ".build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SupervisorError(
            f"cannot create the asset cache {root} ({exc.strerror}): make it writable, or point "
            "AGENTVM_SUPERVISE_CACHE at a writable dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second supervisor waits for the first one's build
        if all((assets.directory / name).exists() for name in ASSET_FILES):
            return assets
        script = resources.files("supervisor") / "guest" / "build-assets.sh"
        with resources.as_file(script) as script_path:
            status = _run_build(["bash", str(script_path), str(assets.directory)])
        if status != 0:
            raise SupervisorError(
                f"building the built-in guest into {assets.directory} failed (status "
                f"{status}); its message is above. The build needs apt-get, dpkg-deb, cpio "
                "and gzip (apt-get install apt dpkg cpio gzip) and a reachable Debian mirror; "
                "run 'apt-get update' as root if downloads failed.",
                exit_code=ExitCode.UNAVAILABLE,
            )
        return assets
    finally:
        os.close(lock)


def _run_build(argv: list[str]) -> int:
    """Run the build in its own process group; a stop signal meanwhile (StopRequested) kills and
    reaps the whole group, apt-get and dpkg-deb included, like any child of ours."""
    proc = subprocess.Popen(
        argv,
        env=child_environment(os.environ, {}),  # no API keys or tokens for apt-get and friends
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return proc.wait()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def guest_cmdline(
    *,
    mounts: Sequence[tuple[str, str]],
    command: Sequence[str] | None,
    guest_uid: int,
    guest_gid: int,
    term: str | None,
    rows: int | None = None,
    cols: int | None = None,
    extra: str = "",
) -> str:
    """The built-in guest's kernel command line: what /init (guest/init.sh) reads."""
    for tag, path in mounts:
        if not re.fullmatch(r"/[A-Za-z0-9_./-]*", path) or "," in tag or ":" in tag:
            raise SupervisorError(
                f"the share '{tag}' cannot be mounted at '{path}' in the built-in guest: guest paths "
                "must be absolute and use only letters, digits and _ . / -",
            )
    parts = ["console=hvc0", "quiet", "panic=-1"]
    parts.append("agentvm.mounts=" + ",".join(f"{tag}:{path}" for tag, path in mounts))
    parts += [f"agentvm.uid={guest_uid}", f"agentvm.gid={guest_gid}"]
    if term and re.fullmatch(r"[A-Za-z0-9_.+-]+", term):
        parts.append(f"agentvm.term={term}")
    if rows and cols:
        parts += [f"agentvm.rows={rows}", f"agentvm.cols={cols}"]
    if command:
        # The guest's busybox sh runs it with `sh -c`; POSIX quoting, only where needed (shorter).
        encoded = base64.b64encode(shlex.join(command).encode()).decode()
        parts.append(f"agentvm.cmd={encoded}")
    if extra:
        parts.append(extra)
    cmdline = " ".join(parts)
    if len(cmdline) > KERNEL_CMDLINE_MAX:
        raise SupervisorError(
            f"the guest command is too long for the kernel command line ({len(cmdline)} of "
            f"{KERNEL_CMDLINE_MAX} bytes): put it in a script under the work dir and run that script",
        )
    return cmdline
