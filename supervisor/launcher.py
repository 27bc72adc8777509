"""The claude-microvm launcher contract: what a user of `make claude.run` keeps when switching.

- WORK_DIR / AGENT_HOME and the derived default agent home, per agent flavor;
- host-visible instance names `<basename>-<agent>-vm-<id>`;
- `$AGENT_HOME/.microvm-env`: DIRENV_ALLOW, ENABLE_CRI and the flavor's API key, which the guest
  `source`s (claude-microvm's modules/base.nix and cri.nix), written atomically with mode 0600;
- the dev-shell cache (`nix print-dev-env` / `devenv print-dev-env`) the guest sources on login;
- port forwards for QEMU's user networking.

Everything here is planned (pure, or reading files) while nothing runs; the two writers
(`write_env_file`, `finish_devshell`) are called by vm.py once the agent home exists. Secrets are
only ever written to the env file: they never reach argv, logs, error messages or a child's
environment.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import ipaddress
import os
import re
import secrets
import shlex
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import diskfull, xdg
from supervisor.config import Agent
from supervisor.errors import ExitCode, SupervisorError

API_KEY_VARS: Mapping[Agent, str] = {
    Agent.CLAUDE: "ANTHROPIC_API_KEY",
    Agent.GEMINI: "GEMINI_API_KEY",
    Agent.CODEX: "OPENAI_API_KEY",
}
# Kept out of every child's environment: no child needs them, and /proc/PID/environ outlives intent.
SECRET_VARS = frozenset(API_KEY_VARS.values())
# Any other credential by its conventional name (GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, ...): QEMU,
# virtiofsd, nix and the probes need none of them.
SECRET_NAME = re.compile(r"(^|_)(API_KEY|TOKEN|SECRET|SECRET_ACCESS_KEY|PASSWORD|PASSWD)$", re.IGNORECASE)
# Readiness is the supervisor's to report; a child (e.g. a cloud-hypervisor runner's socat) must not
# talk to systemd's notify socket on its own.
PRIVATE_VARS = SECRET_VARS | {"NOTIFY_SOCKET"}


def is_secret(name: str) -> bool:
    return name in SECRET_VARS or SECRET_NAME.search(name) is not None


def is_private(name: str) -> bool:
    return name in PRIVATE_VARS or is_secret(name)


CRI_RUNTIMES = ("containerd", "crun", "crio", "docker", "podman")

ENV_FILE = ".microvm-env"
DEVSHELL_CACHE = ".microvm-devshell"
# The files whose content decides whether the cached dev shell is still current (claude-microvm's list
# and order: the same hash, so a cache made by the old launcher stays valid).
DEVSHELL_INPUTS = ("flake.nix", "flake.lock", ".devenv.flake.nix", "devenv.nix", "devenv.yaml", "devenv.lock")


def project_basename(work_dir: Path) -> str:
    """claude-microvm's <basename>: the dir name's first 12 chars of [A-Za-z0-9_-], or "root"."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "", work_dir.name)[:12]
    return cleaned or "root"


def default_agent_home(work_dir: Path, env: Mapping[str, str], agent: Agent | str = Agent.CLAUDE) -> Path:
    """$XDG_DATA_HOME/<agent>-microvm/<basename>-<first 12 hex of sha256(resolved work dir)>."""
    digest = hashlib.sha256(os.fsencode(work_dir)).hexdigest()[:12]
    return (
        xdg.base("XDG_DATA_HOME", env)
        / f"{Agent(agent).value}-microvm"
        / f"{project_basename(work_dir)}-{digest}"
    )


def _absolute(raw: str, cwd: Path) -> Path:
    path = Path(raw).expanduser()
    return path if path.is_absolute() else cwd / path


def work_dir_source(config_value: str | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The configured work dir (flag/config first, then $WORK_DIR) and what named it, for errors."""
    if config_value:
        return config_value, "--work-dir (or work-dir in the config)"
    if env.get("WORK_DIR"):
        return env["WORK_DIR"], "WORK_DIR"
    return None, "the current directory"


def resolve_agent_home(
    config_value: str | None, env: Mapping[str, str], *, work_dir: Path, agent: Agent, cwd: Path
) -> Path:
    """--agent-home / agent-home, else $AGENT_HOME, else the default. Not resolved here: the plan
    resolves share sources without following links a guest could have planted (see sharedirs)."""
    raw = config_value or env.get("AGENT_HOME")
    path = _absolute(raw, cwd) if raw else default_agent_home(work_dir, env, agent)
    return Path(os.path.normpath(path))


def instance_prefix(work_dir: Path, agent: Agent) -> str:
    return f"{project_basename(work_dir)}-{agent.value}-vm"


def child_environment(env: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The environment every child gets: ours without secrets (API keys, tokens) and NOTIFY_SOCKET,
    plus `extra`."""
    return {**{k: v for k, v in env.items() if not is_private(k)}, **extra}


def scrub_proc_environ(names: Iterable[str] | None = None) -> None:
    """Blank the values of `names` (default: every secret, `is_secret`) in this process's initial
    environment block.

    /proc/PID/environ shows that block (mm->env_start..env_end), and a fork without exec (the
    watchdog) shows it too. os.environ is a copy Python made at startup, so the keys stay usable for
    .microvm-env; C's getenv() sees them empty from now on. Best effort: a kernel that hides the
    addresses (they read 0 without ptrace access to oneself) leaves the block as it is.
    """
    if names is None:
        names = [name for name in os.environ if is_secret(name)]
    wanted = {os.fsencode(name) for name in names}
    try:
        fields = Path("/proc/self/stat").read_bytes().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # fields 50 and 51: env_start, env_end
    except (OSError, IndexError, ValueError):
        return
    if not 0 < start < end:
        return
    offset = start
    for entry in ctypes.string_at(start, end - start).split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep and name in wanted and value:
            ctypes.memset(offset + len(name) + 1, 0, len(value))
        offset += len(entry) + 1


# ---- port forwards ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    proto: str  # "tcp" or "udp"
    host_addr: str
    host_port: int
    guest_port: int

    def hostfwd(self) -> str:
        """QEMU's user-netdev syntax; the guest address defaults to slirp's 10.0.2.15."""
        return f"hostfwd={self.proto}:{self.host_addr}:{self.host_port}-:{self.guest_port}"


def parse_forward(text: str) -> Forward:
    """`[ADDR:]HOST:GUEST[/tcp|/udp]`; ADDR defaults to 127.0.0.1 (not every interface)."""
    spec, _, proto = text.partition("/")
    proto = proto or "tcp"
    parts = spec.split(":")
    ok = proto in ("tcp", "udp") and len(parts) in (2, 3) and all(p.isdigit() for p in parts[-2:])
    if ok and len(parts) == 3:
        try:
            ipaddress.IPv4Address(parts[0])
        except ValueError:
            ok = False
    ports = [int(p) for p in parts[-2:]] if ok else []
    if not ok or not all(1 <= port <= 65535 for port in ports):
        raise SupervisorError(
            f"invalid port forward '{text}': write HOST:GUEST (e.g. 8080:80), ADDR:HOST:GUEST to "
            "listen on another IPv4 address than 127.0.0.1 (0.0.0.0: every interface), and /udp for UDP; "
            "ports are 1..65535",
        )
    addr = parts[0] if len(parts) == 3 else "127.0.0.1"
    return Forward(proto, addr, ports[0], ports[1])


def parse_forwards(texts: Iterable[str]) -> list[Forward]:
    forwards = [parse_forward(text) for text in texts]
    seen: set[tuple[str, str, int]] = set()
    for forward in forwards:
        key = (forward.proto, forward.host_addr, forward.host_port)
        if key in seen:
            raise SupervisorError(
                f"host port {forward.host_port}/{forward.proto} on {forward.host_addr} is forwarded twice: "
                "give each --forward its own host port",
            )
        seen.add(key)
    return forwards


# ---- the env file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvFile:
    path: Path
    # (name, value); values may be secrets: repr=False keeps them out of any traceback or debug dump
    entries: tuple[tuple[str, str], ...] = field(repr=False)
    owner: tuple[int, int] | None  # chown to this (uid, gid) when running as root


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def plan_env_file(
    agent_home: Path,
    env: Mapping[str, str],
    agent: Agent,
    owner: tuple[int, int] | None,
    *,
    extra: Sequence[tuple[str, str]] = (),  # e.g. the egress proxy's variables (egress.guest_env)
) -> EnvFile:
    """What `.microvm-env` will hold; bad values are rejected here, without echoing secrets."""
    direnv = env.get("DIRENV_ALLOW", "")
    if direnv not in ("", "0", "1"):
        raise SupervisorError(
            f"DIRENV_ALLOW is '{direnv}': set it to 1 to load the project's dev shell in the guest, "
            "or 0 (or leave it unset) not to",
        )
    cri = env.get("ENABLE_CRI", "")
    items = [item.replace(" ", "") for item in cri.split(",")] if cri.strip() else []
    unknown = [item for item in items if item not in CRI_RUNTIMES]
    if unknown:
        raise SupervisorError(
            f"ENABLE_CRI names unknown container runtimes ({', '.join(repr(u) for u in unknown)}): use a "
            f"comma-separated list of {', '.join(CRI_RUNTIMES)}, or leave it empty",
        )
    entries = [("DIRENV_ALLOW", direnv or "0"), ("ENABLE_CRI", ",".join(items))]
    key_var = API_KEY_VARS[agent]
    key = api_key(env, key_var)
    if key:
        if any(char in key for char in "\n\r\0"):
            raise SupervisorError(
                f"{key_var} contains a line break or NUL character, which no API key has: set it to the "
                "key alone (its value is not shown here)",
            )
        entries.append((key_var, key))
    entries += extra
    return EnvFile(agent_home / ENV_FILE, tuple(entries), owner)


def api_key(env: Mapping[str, str], key_var: str) -> str:
    """The key from `key_var`, or read from the file `key_var`_FILE names (a Kubernetes Secret or a
    Podman secret mounted as a file: unlike an environment variable, it is not in the pod spec, in
    `/proc/1/environ` or in `kubectl describe`). One trailing line break is dropped, as files end."""
    file_var = f"{key_var}_FILE"
    path = env.get(file_var, "")
    if not path:
        return env.get(key_var, "")
    if env.get(key_var):
        raise SupervisorError(
            f"both {key_var} and {file_var} are set: keep one (the file, to keep the key out of the "
            "environment)",
        )
    try:
        with Path(path).open("rb") as file:
            data = file.read(64 * 1024 + 1)
    except OSError as exc:
        raise SupervisorError(
            f"cannot read the API key file {path} named by {file_var} ({exc.strerror}): mount the "
            "secret there (Kubernetes: a secret volume; Podman: --secret) or fix the path",
            exit_code=ExitCode.NO_INPUT,
        ) from None
    if len(data) > 64 * 1024:
        raise SupervisorError(
            f"the API key file {path} named by {file_var} is over 64 KiB, which no API key is: "
            "point it at the file that holds the key alone",
        )
    try:
        key = data.decode()
    except UnicodeDecodeError:
        raise SupervisorError(
            f"the API key file {path} named by {file_var} is not text: point it at the file that "
            "holds the key alone",
        ) from None
    return key.removesuffix("\n").removesuffix("\r")


def write_env_file(plan: EnvFile) -> None:
    """Replace the env file atomically: a new 0600 file next to it, fsync'd, renamed over it."""
    text = "".join(f"{name}={_shell_quote(value)}\n" for name, value in plan.entries)
    _write_atomically(plan.path, text.encode(), plan.owner)


def _write_atomically(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            if owner is not None:
                os.fchown(fd, *owner)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        diskfull.raise_if_full(path, exc)
        if path.is_dir() and not path.is_symlink():
            raise SupervisorError(
                f"{path} is a directory where agentvm-supervise keeps a file (the guest can write "
                f"there, and may have made it): remove it (rm -r {shlex.quote(str(path))}) and start again",
                exit_code=ExitCode.CANT_CREATE,
            ) from None
        raise SupervisorError(
            f"cannot write {path} ({exc.strerror}): the agent home must be a writable directory of "
            "this user; fix its permissions or choose another with --agent-home / AGENT_HOME",
            exit_code=ExitCode.CANT_CREATE,
        ) from None


# ---- the dev-shell cache ---------------------------------------------------------------------


@dataclass(frozen=True)
class Devshell:
    """A dev-shell cache refresh to run before the VM starts (`argv` None: the tool is missing)."""

    work_dir: Path
    cache: Path  # AGENT_HOME/.microvm-devshell; .err and .hash next to it
    digest: str
    argv: list[str] | None
    missing: str  # why argv is None: written to the .err file
    owner: tuple[int, int] | None
    # Outputs go to files of this instance's own and are renamed into place: two launches on one
    # project refreshing at once never write into the same file.
    token: str = field(default_factory=lambda: secrets.token_hex(4))

    @property
    def temporary(self) -> Path:
        return self.cache.with_name(f"{DEVSHELL_CACHE}.{self.token}.tmp")

    @property
    def errors_temporary(self) -> Path:
        return self.cache.with_name(f"{DEVSHELL_CACHE}.err.{self.token}.tmp")

    @property
    def errors(self) -> Path:
        return self.cache.with_name(DEVSHELL_CACHE + ".err")

    @property
    def hash_file(self) -> Path:
        return self.cache.with_name(DEVSHELL_CACHE + ".hash")

    def discard(self) -> None:
        """Remove this refresh's temporary files (it was stopped, or is finished)."""
        for path in (self.temporary, self.errors_temporary):
            with contextlib.suppress(OSError):
                path.unlink()


def devshell_digest(work_dir: Path) -> str:
    """claude-microvm's hash: sha256 of the inputs that exist, concatenated in order, 16 hex chars."""
    digest = hashlib.sha256()
    for name in DEVSHELL_INPUTS:
        with contextlib.suppress(OSError):
            digest.update((work_dir / name).read_bytes())
    return digest.hexdigest()[:16]


def plan_devshell(
    work_dir: Path, agent_home: Path, env: Mapping[str, str], owner: tuple[int, int] | None
) -> Devshell | None:
    """The refresh to run, or None: DIRENV_ALLOW is not 1, no dev shell, or the cache is current.

    Only with DIRENV_ALLOW=1, as claude-microvm's README says (its script's `A && B || C` also ran it
    for every .devenv.flake.nix project).
    """
    if env.get("DIRENV_ALLOW") != "1":
        return None
    has_flake = (work_dir / "flake.nix").is_file()
    if not has_flake and not (work_dir / ".devenv.flake.nix").is_file():
        return None
    cache = agent_home / DEVSHELL_CACHE
    digest = devshell_digest(work_dir)
    try:
        current = cache.stat().st_size > 0 and (cache.with_name(DEVSHELL_CACHE + ".hash")).read_text().strip()
    except OSError:
        current = False
    if current == digest:
        return None
    if not has_flake:
        tool, args = "devenv", ["print-dev-env"]
    elif (work_dir / "devenv.nix").is_file():
        tool, args = "nix", ["print-dev-env", "--no-update-lock-file", "--impure", str(work_dir)]
    else:
        tool, args = "nix", ["print-dev-env", "--no-update-lock-file", str(work_dir)]
    found = shutil.which(tool, path=env.get("PATH", os.defpath))
    missing = "" if found else f"{tool} was not found on PATH ({env.get('PATH', os.defpath)}): install it"
    return Devshell(work_dir, cache, digest, [found, *args] if found else None, missing, owner)


def open_devshell_outputs(plan: Devshell) -> tuple[int, int]:
    """Create this refresh's stdout and stderr files (0600); they are renamed into place after."""
    fds = []
    try:
        for path in (plan.temporary, plan.errors_temporary):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            fds.append(fd)
            if plan.owner is not None:
                os.fchown(fd, *plan.owner)
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        plan.discard()
        raise SupervisorError(
            f"cannot create the dev-shell cache files in {plan.cache.parent} ({exc.strerror}): the "
            "agent home must be writable by this user",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    return fds[0], fds[1]


def finish_devshell(plan: Devshell, status: int | None) -> bool:
    """After the refresh: on success the cache and its hash replace the old ones and the old .err
    goes; on failure the tool's stderr becomes .err and the previous cache stays."""
    try:
        if plan.argv is None:
            _write_atomically(plan.errors, (plan.missing + "\n").encode(), plan.owner)
            return False
        if status != 0:
            with contextlib.suppress(OSError):
                plan.errors_temporary.replace(plan.errors)
            return False
        try:
            plan.temporary.replace(plan.cache)
        except OSError:
            return False
        _write_atomically(plan.hash_file, (plan.digest + "\n").encode(), plan.owner)
        with contextlib.suppress(OSError):
            plan.errors.unlink()
        return True
    finally:
        plan.discard()
