"""The container engine for tests/test_container.py: Podman from Debian, an image built from the
Containerfile on a base made here (no registry), and the engine settings this kind of host needs.

Found on the test machines (Debian 12, podman 4.3, as root without CAP_SYS_RESOURCE):
- Podman asks the OCI runtime for RLIMIT_NOFILE 1048576 and RLIMIT_NPROC 4194304 by default, above
  the hard limits here; without CAP_SYS_RESOURCE raising them fails (`setrlimit RLIMIT_NPROC:
  Operation not permitted`). The runtime also runs with RLIMIT_NPROC lowered to kernel.pid_max
  (seen: 96363 for the shell, 32768 for the runtime). So the tests' containers.conf sets
  default_ulimits at or below what this process may have, and no raise is needed.
- crun refuses a host with cgroup v1 plus an empty unified hierarchy ("cgroups in hybrid mode not
  supported, drop all controllers from cgroupv2"); runc runs there.
The containers.conf is the test's own (CONTAINERS_CONF), nothing on the host is changed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO, TEST_CACHE

BASE_SUITE = "trixie"
BASE_IMAGE = f"localhost/agentvm-supervise-base:{BASE_SUITE}"
IMAGE = "localhost/agentvm-supervise:test"
BUILD_STAGE = "localhost/agentvm-supervise:test-build-stage"
BASE_TARBALL = TEST_CACHE / "container" / f"debian-{BASE_SUITE}-minbase.tar"
# pip in the image build goes through whatever TLS proxy this machine has: hand it this CA bundle.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def engine_limits() -> tuple[int, int]:
    """RLIMIT_NOFILE and RLIMIT_NPROC the runtime can set without raising a hard limit."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    if nproc == resource.RLIM_INFINITY or nproc > pid_max:
        nproc = pid_max
    if nofile == resource.RLIM_INFINITY:
        nofile = 1048576
    return nofile, nproc


@dataclass(frozen=True)
class Podman:
    conf: Path

    @classmethod
    def configure(cls, directory: Path) -> Podman:
        nofile, nproc = engine_limits()
        conf = directory / "containers.conf"
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
        )
        return cls(conf)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CONTAINERS_CONF": str(self.conf),
            "LANG": "C.UTF-8",
            "HOME": os.environ.get("HOME", "/root"),
        }
        env.update(extra or {})
        return env

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = 120,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        # Bytes, decoded here: text mode would turn the console's \r\n into \n.
        raw = subprocess.run(
            ["podman", *args], capture_output=True, env=self.env(env), timeout=timeout, check=False
        )
        result = subprocess.CompletedProcess(
            raw.args, raw.returncode, raw.stdout.decode(errors="replace"), raw.stderr.decode(errors="replace")
        )
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def remove(self, name: str) -> None:
        """Cleanup for a failed test: the container and everything in it."""
        self.run(["rm", "--force", "--time", "0", name], check=False)


def ensure_base(podman: Podman) -> None:
    """Debian minbase as an image, made by mmdebstrap (~35 s) and kept as a tarball in the test cache."""
    if podman.run(["image", "exists", BASE_IMAGE], check=False).returncode == 0:
        return
    if not BASE_TARBALL.exists():
        BASE_TARBALL.parent.mkdir(parents=True, exist_ok=True)
        partial = BASE_TARBALL.with_name(f".{BASE_TARBALL.stem}.{os.getpid()}.tar")
        try:
            subprocess.run(
                ["mmdebstrap", "--quiet", "--variant=minbase", "--format=tar", BASE_SUITE, str(partial)],
                check=True, capture_output=True, timeout=900,
            )  # fmt: skip
            partial.replace(BASE_TARBALL)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    podman.run(["import", str(BASE_TARBALL), BASE_IMAGE], timeout=300)


def build_image(podman: Podman) -> float:
    """Build the Containerfile as README says (chroot isolation, the local base); seconds taken.
    Podman's layer cache makes a rebuild with unchanged inputs take seconds.

    The build stage is tagged too (BUILD_STAGE): untagged, it would be a dangling image after every
    source edit (~1.4 GB with the agent guest), and the prune at the end removes exactly those,
    so repeated runs on one machine do not fill its disk, and the next build keeps its cache."""
    ensure_base(podman)
    started = time.monotonic()
    secret = ["--secret", f"id=ca,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    common = ["build", "--isolation", "chroot", "--cap-add", "SYS_ADMIN", "--build-arg", f"BASE={BASE_IMAGE}",
              *secret, "--file", str(REPO / "Containerfile")]  # fmt: skip
    podman.run([*common, "--target", "build", "--tag", BUILD_STAGE, str(REPO)], timeout=1800)
    podman.run([*common, "--tag", IMAGE, str(REPO)], timeout=1800)
    podman.run(["image", "prune", "--force"], timeout=300)
    return time.monotonic() - started


def cannot_run_containers(podman: Podman) -> str | None:
    """Why `podman run` fails on this host (its own words), or None if it runs containers."""
    result = podman.run(
        ["run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", IMAGE, "-c", "exit 3"], check=False
    )
    if result.returncode == 3:
        return None
    return f"`podman run` exited {result.returncode}: {result.stderr.strip()}"


def have_podman() -> bool:
    return shutil.which("podman") is not None and shutil.which("mmdebstrap") is not None
