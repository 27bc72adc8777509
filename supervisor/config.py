"""Configuration: frozen msgspec structs decoded from one TOML document.

`load()` is the only entry point. It decodes the file, lays the CLI overrides over the decoded
document (so a bad flag value gets the same `$.path` error as a bad file value) and converts the
result in one step. It does not probe the filesystem or read the environment: `plan` does that.
Every field is documented in docs/config.md; keep the two in step.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from supervisor.errors import ExitCode, SupervisorError

TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,35}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"

Tag = Annotated[str, msgspec.Meta(pattern=TAG_PATTERN)]
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]
Uid = Annotated[int, msgspec.Meta(ge=0, le=4294967294)]


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="kebab", kw_only=True):
    pass


class Accel(enum.StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class SocketMode(enum.StrEnum):
    FD = "fd"  # the supervisor binds the vhost-user socket and hands it over with --fd
    PATH = "path"  # virtiofsd creates --socket-path itself; readiness is the socket appearing


class Cache(enum.StrEnum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"
    METADATA = "metadata"


class UidMapping(enum.StrEnum):
    AUTO = "auto"  # "user-namespace" when unprivileged, "translate" when root
    USER_NAMESPACE = "user-namespace"  # virtiofsd --uid-map/--gid-map: guest uid -> the invoking user
    TRANSLATE = "translate"  # root only: --translate-uid/gid guest uid -> host-uid/host-gid
    NONE = "none"  # ids pass through unchanged


class Machine(enum.StrEnum):
    Q35 = "q35"
    MICROVM = "microvm"


class Agent(enum.StrEnum):
    """The coding agent (claude-microvm's flavor): names the agent home and the instance."""

    CLAUDE = "claude"
    GEMINI = "gemini"
    CODEX = "codex"


class GuestKind(enum.StrEnum):
    """What our own QEMU boots when there is no runner and no qemu.kernel."""

    BUILTIN = "builtin"  # the busybox guest (guest/init.sh): a shell or the command after --
    AGENT = "agent"  # the agent flavor's Debian guest (agentguest.py): the agent, or the command


class Hypervisor(enum.StrEnum):
    AUTO = "auto"  # the runner's share/microvm/hypervisor, else the program its exec line runs
    QEMU = "qemu"
    CLOUD_HYPERVISOR = "cloud-hypervisor"


class Share(_Strict, frozen=True):
    tag: Tag
    source: str
    guest_path: str | None = None
    read_only: bool = False
    guest_uid: Uid = 1000
    guest_gid: Uid = 1000
    # Host owner the guest uid/gid maps to when the supervisor runs as root; None: the owner of source.
    host_uid: Uid | None = None
    host_gid: Uid | None = None
    uid_mapping: UidMapping = UidMapping.AUTO
    xattr: bool = True
    xattrmap: str | None = None
    cache: Cache = Cache.AUTO
    create: bool = False  # create source (0700) if missing; otherwise a missing source is an error


class Virtiofsd(_Strict, frozen=True):
    binary: str | None = None  # None: the built-in guest's virtiofsd, else `virtiofsd` on PATH
    socket_mode: SocketMode = SocketMode.FD
    sandbox: str = "namespace"
    # Where namespaces are unavailable (a container's seccomp profile, a sysctl): run virtiofsd with
    # --sandbox=none (chroot as root) and --translate-uid/gid instead of failing. Off by default.
    sandbox_fallback: bool = False
    extra_args: list[str] = []


class Qemu(_Strict, frozen=True):
    binary: str = "qemu-system-x86_64"
    machine: Machine = Machine.Q35
    accel: Accel = Accel.AUTO
    # The node the supervisor checks and waits for; QEMU itself always opens /dev/kvm.
    kvm_device: str = "/dev/kvm"
    cpu: str | None = None  # None: "host" under KVM, "max" under TCG
    kernel: str | None = None  # None (with initrd None): the built-in guest
    initrd: str | None = None
    cmdline: str = ""
    # None: 512 / 1 for the built-in guest; a microvm.nix runner keeps its own
    memory_mib: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] | None = None
    vcpus: Annotated[int, msgspec.Meta(ge=1, le=256)] | None = None
    extra_args: list[str] = []
    # QEMU's seccomp filter (qemu.SANDBOX): the guest is untrusted. false only for extra-args that
    # need QEMU to start programs (e.g. guestfwd=...-cmd:).
    sandbox: bool = True


class Timeouts(_Strict, frozen=True):
    socket_ready: Seconds = 5.0  # virtiofsd --socket-path mode: socket must appear by then
    graceful_stop: Seconds = 10.0  # system_powerdown -> runner exit
    quit: Seconds = 3.0  # QMP quit -> runner exit
    kill_grace: Seconds = 2.0  # SIGTERM to a process group -> SIGKILL


class Runner(_Strict, frozen=True):
    """A microvm.nix runner (`bin/microvm-run`) run instead of the supervisor's own QEMU command."""

    script: str  # the runner's bin/microvm-run, or the runner package's directory
    hypervisor: Hypervisor = Hypervisor.AUTO
    cwd: str | None = None  # the runner's working directory; None: the instance's runtime dir


class Ssh(_Strict, frozen=True):
    """The built-in guest's SSH server (dropbear) on a tap network; see supervisor/sshkeys.py."""

    enable: bool | None = None  # None: on with network mode "tap" and the built-in guest
    authorized_keys: list[str] = []  # public keys (one .pub line each) that may log in as agent
    host_keys: str | None = None  # None: $XDG_STATE_HOME/agentvm-supervise/vms/NAME/ssh-host-keys


class ConsoleConfig(_Strict, frozen=True):
    escape_key: str = "ctrl-]"  # ctrl-X, ^X, one character, or "none"; checked by plan
    filter: bool = True  # the hostile-output filter (console.filter); false passes the guest's bytes as is
    replay_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 << 20)] = 64 << 10
    log: bool = True
    log_dir: str | None = None  # None: $XDG_STATE_HOME/agentvm-supervise/console
    log_max_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 30)] = 4 << 20
    log_keep: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 20


class NetworkMode(enum.StrEnum):
    OPEN = "open"  # QEMU user-mode NAT: the guest reaches what the host reaches
    ALLOWLIST = "allowlist"  # the only way out is the supervisor's egress proxy (supervisor/egress)
    NONE = "none"  # no network device at all
    TAP = "tap"  # a tap on a host bridge: a static address the host and other VMs reach (CAP_NET_ADMIN)


class Preset(enum.StrEnum):
    AGENT = "agent"  # the agent flavor's API and login hosts
    DEVELOPMENT = "development"  # GitHub, npm, PyPI, crates.io, Debian (docs/egress.md)


class Network(_Strict, frozen=True):
    """The guest's network (docs/config.md, docs/egress.md). allow, deny and presets are for mode
    "allowlist"; bridge, address, gateway, dns, tap, mac, bridge-create and nat for mode "tap"."""

    mode: NetworkMode | None = None  # None: allowlist for agent guests, open for the built-in shell guest
    allow: list[str] = []  # HOST, *.SUFFIX or ADDRESS, each with an optional :PORT
    deny: list[str] = []  # checked first: deny wins
    presets: list[Preset] = msgspec.field(default_factory=lambda: [Preset.AGENT, Preset.DEVELOPMENT])
    bridge: str | None = None  # an existing host bridge the tap joins
    address: str | None = None  # the guest's IPv4 address with prefix, e.g. "192.168.83.2/24"
    gateway: str | None = None  # None: the bridge's own address in the guest's subnet
    dns: str | None = None  # None: the gateway
    tap: str | None = None  # None: "mv" + 11 hex digits of the VM name's sha256, as seed 003 names it
    mac: str | None = None  # None: derived from the VM name
    # Make the bridge (at the gateway's address) when it is missing, remove it with its last VM; no NAT.
    bridge_create: bool = False
    nat: bool = False  # with bridge-create: masquerade the subnet (nftables) and turn IPv4 forwarding on


class Config(_Strict, frozen=True):
    name: Name | None = None  # None: <basename>-<agent>-vm, as claude-microvm names its VMs
    agent: Agent = Agent.CLAUDE
    guest: GuestKind = GuestKind.BUILTIN
    runtime_dir: str | None = None  # base dir for instance dirs; None: $XDG_RUNTIME_DIR/agentvm, ...
    work_dir: str | None = None  # the project dir (/work); None: $WORK_DIR, else the current directory
    agent_home: str | None = None  # None: $AGENT_HOME, else $XDG_DATA_HOME/<agent>-microvm/<basename>-<hash>
    forwards: list[str] = []  # "[ADDR:]HOST:GUEST[/udp]" port forwards (QEMU user networking)
    runner: Runner | None = None
    network: Network = Network()
    ssh: Ssh = Ssh()
    shares: list[Share] | None = None  # None: work, agent-home, cri-storage as claude-microvm has them
    virtiofsd: Virtiofsd = Virtiofsd()
    qemu: Qemu = Qemu()
    timeouts: Timeouts = Timeouts()
    console: ConsoleConfig = ConsoleConfig()


def _paragraph(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, dict):
            merged[key] = _merge(current, value)
        else:
            merged[key] = value
    return merged


def _field_type(path: str) -> Any:
    """The type at a msgspec error path like `$.shares[0].cache`, or None if it can't be followed."""
    current: Any = Config
    for part in re.findall(r"\.([A-Za-z0-9_-]+)|\[\d+\]", path):
        while True:  # unwrap `X | None` and `list[X]`
            args = [arg for arg in typing.get_args(current) if arg is not type(None)]
            origin = typing.get_origin(current)
            wrapper = origin in (list, types.UnionType, typing.Union) and len(args) == 1
            if origin is typing.Annotated or wrapper:
                current = args[0]
            else:
                break
        if not part:  # an index: already unwrapped the list
            continue
        if not (isinstance(current, type) and issubclass(current, msgspec.Struct)):
            return None
        by_name = {field.encode_name: field.type for field in msgspec.structs.fields(current)}
        if part not in by_name:
            return None
        current = by_name[part]
    args = [arg for arg in typing.get_args(current) if arg is not type(None)]
    return args[0] if len(args) == 1 else current


def _explain(error: msgspec.ValidationError) -> str:
    # An optional field reads "Expected `int | null`": TOML has no null; leaving a field out is how.
    text = str(error).replace(" | null`", "`")
    found = re.search(r"`(\$[^`]*)`", text)
    if found and "enum value" in text:
        kind = _field_type(found.group(1))
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            text += f" (valid values: {', '.join(str(member.value) for member in kind)})"
    return text


# The fields that hold a path we pass on (to virtiofsd, QEMU, the watchdog, the guest's files).
PATH_FIELDS = frozenset(
    {"runtime-dir", "work-dir", "agent-home", "source", "guest-path", "binary", "kvm-device", "kernel",
     "initrd", "script", "cwd", "log-dir"}
)  # fmt: skip
# C0 controls, DEL and C1 controls: a newline in a path once made the watchdog remove another dir.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def control_character(text: str) -> str | None:
    """A readable name of the first control character in `text` (e.g. '\\n'), or None."""
    found = _CONTROL.search(text)
    return repr(found.group())[1:-1] if found else None


def _find_bad(value: Any, where: str, key: str = "") -> tuple[str, str] | None:
    """(`$.path`, what is wrong) of the first string with a NUL byte, or a path with a control character."""
    if isinstance(value, str):
        if "\0" in value:
            return where, "contains a NUL byte, which no path or command-line argument can hold"
        char = control_character(value) if key in PATH_FIELDS else None
        if char is not None:
            return where, f"is a path with a control character ({char}), which no path we pass on may hold"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        found = _find_bad(
            item,
            f"{where}[{name}]" if isinstance(name, int) else f"{where}.{name}",
            key if isinstance(name, int) else str(name),
        )
        if found:
            return found
    return None


# Environment variables that name paths we use or pass on (the launcher's, XDG's, the cache's).
PATH_VARIABLES = (
    "WORK_DIR", "AGENT_HOME", "HOME", "XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_DATA_HOME",
    "XDG_CACHE_HOME", "AGENTVM_SUPERVISE_CACHE",
)  # fmt: skip


def check_environment_paths(env: Mapping[str, str], cwd: str | None = None) -> None:
    """Refuse a path-naming variable (or the current dir, when it is used) with a control character."""
    named = [(f"${name}", env[name]) for name in PATH_VARIABLES if env.get(name)]
    if cwd is not None:
        named.append(("the current directory", cwd))
    for what, value in named:
        char = control_character(value)
        if char is not None:
            raise SupervisorError(
                f"{what} ({value!r}) has a control character ({char}), which no path we pass on may "
                "hold: rename the directory, or set the variable (or the flag that overrides it) to "
                "another path"
            )


def load(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Decode the TOML file at `path` (None: no file) with `overrides` laid over it."""
    document: dict[str, Any] = {}
    where = "the command-line flags"
    if path is not None:
        where = f"{path} (or the flags laid over it)" if overrides else str(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise SupervisorError(
                f"config file {path} does not exist: pass an existing file to --config, "
                "or leave --config out to boot the built-in guest",
                exit_code=ExitCode.NO_INPUT,
            ) from None
        except OSError as exc:
            raise SupervisorError(
                f"config file {path} cannot be read ({exc.strerror}): check its permissions",
                exit_code=ExitCode.NO_INPUT,
            ) from None
        try:
            document = msgspec.toml.decode(raw)
        except msgspec.DecodeError as exc:
            raise SupervisorError(
                _paragraph(f"config file {path} is not valid TOML: {exc}. Fix the syntax at that spot.")
            ) from None
    merged = _merge(document, overrides or {})
    bad = _find_bad(merged, "$")
    if bad is not None:
        raise SupervisorError(
            f"invalid configuration in {where}: the value at `{bad[0]}` {bad[1]}; remove it (an escape "
            "such as \\u0000 or \\n in the TOML, or a stray byte in a flag)"
        )
    try:
        return msgspec.convert(merged, Config)
    except msgspec.ValidationError as exc:
        raise SupervisorError(
            _paragraph(
                f"invalid configuration in {where}: {_explain(exc)}. See docs/config.md for every "
                "field, its type and its allowed values; field names are kebab-case (e.g. memory-mib)."
            )
        ) from None
