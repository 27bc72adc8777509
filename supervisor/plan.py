"""From configuration to a checked plan: everything `run` needs, validated before anything starts.

This is where the filesystem and the environment are looked at (config.py does neither): share
directories, binaries, /dev/kvm, the uid mapping, socket path lengths. Every failure here is a
SupervisorError raised while nothing exists yet, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import guest, kvm, runtime
from supervisor.config import Accel, Config, ConsoleConfig, Share, SocketMode, Timeouts, UidMapping
from supervisor.console import ConsoleSettings, parse_escape_key
from supervisor.errors import ExitCode, SupervisorError
from supervisor.virtiofsd import CRI_STORAGE_XATTRMAP, ShareIds, ShareSpec

DEFAULT_AGENT = "claude"


@dataclass(frozen=True, kw_only=True)
class Plan:
    instance: str
    instance_dir: Path
    base_dir: Path
    shares: list[ShareSpec]
    virtiofsd_binary: str
    socket_mode: SocketMode
    sandbox: str
    virtiofsd_extra_args: list[str]
    qemu_binary: str
    machine: str
    accel: Accel
    accel_reason: str
    cpu: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    memory_mib: int
    vcpus: int
    qemu_extra_args: list[str]
    builtin_guest: bool
    command: list[str] | None
    timeouts: Timeouts
    work_dir: Path | None
    console: ConsoleSettings = field(default_factory=ConsoleSettings)

    @property
    def qmp_socket(self) -> Path:
        return self.instance_dir / "qmp.sock"

    @property
    def console_socket(self) -> Path:
        return self.instance_dir / "console.sock"

    @property
    def status_file(self) -> Path:
        return self.instance_dir / "guest-status"


def project_basename(work_dir: Path) -> str:
    """claude-microvm's <basename>: the dir name's first 12 chars of [A-Za-z0-9_-], or "root"."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "", work_dir.name)[:12]
    return cleaned or "root"


def default_agent_home(work_dir: Path, env: Mapping[str, str], agent: str = DEFAULT_AGENT) -> Path:
    data_home = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "/root")) / ".local" / "share")
    digest = hashlib.sha256(os.fsencode(work_dir)).hexdigest()[:12]
    return Path(data_home) / f"{agent}-microvm" / f"{project_basename(work_dir)}-{digest}"


def default_console_log_dir(env: Mapping[str, str]) -> Path:
    state_home = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "/root")) / ".local" / "state")
    return Path(state_home) / "agentvm-supervise" / "console"


def console_settings(config: ConsoleConfig, env: Mapping[str, str]) -> ConsoleSettings:
    try:
        escape = parse_escape_key(config.escape_key)
    except ValueError as exc:
        raise SupervisorError(f"$.console.escape-key (or --escape-key): {exc}") from None
    log_dir: Path | None = None
    if config.log:
        log_dir = Path(config.log_dir).expanduser() if config.log_dir else default_console_log_dir(env)
        if not log_dir.is_absolute():
            raise SupervisorError(f"$.console.log-dir '{config.log_dir}' is relative: give an absolute path")
    return ConsoleSettings(
        escape=escape,
        filter=config.filter,
        replay_bytes=config.replay_bytes,
        log_dir=log_dir,
        log_max_bytes=config.log_max_bytes,
        log_keep=config.log_keep,
    )


def _find_binary(name: str, what: str, remedy: str) -> str:
    if "/" in name:
        path = Path(name)
        if not path.is_file():
            raise SupervisorError(f"{what} {name} does not exist: {remedy}", exit_code=ExitCode.UNAVAILABLE)
        if not os.access(path, os.X_OK):
            raise SupervisorError(
                f"{what} {name} is not executable by this user: chmod +x it, or {remedy}",
                exit_code=ExitCode.UNAVAILABLE,
            )
        return str(path.resolve())
    found = shutil.which(name)
    if found is None:
        raise SupervisorError(
            f"{what} '{name}' was not found on PATH: {remedy}", exit_code=ExitCode.UNAVAILABLE
        )
    return found


def _default_shares(work_dir: Path, agent_home: Path) -> list[Share]:
    return [
        Share(tag="work", source=str(work_dir), guest_path="/work"),
        Share(tag="agent-home", source=str(agent_home), guest_path="/home/agent", create=True),
        Share(
            tag="cri-storage",
            source=str(agent_home / "cri-storage"),
            guest_path="/var/lib/containers",
            xattrmap=CRI_STORAGE_XATTRMAP,
            create=True,
        ),
    ]


def _resolve_ids(share: Share, index: int, source: Path, owner: os.stat_result, euid: int) -> ShareIds:
    mapping = share.uid_mapping
    if mapping is UidMapping.AUTO:
        mapping = UidMapping.TRANSLATE if euid == 0 else UidMapping.USER_NAMESPACE
    if euid == 0 and mapping is UidMapping.USER_NAMESPACE:
        raise SupervisorError(
            f"share '{share.tag}' (shares[{index}]) asks for uid-mapping = \"user-namespace\", which "
            'virtiofsd refuses when run as root: use "translate" (or "auto") as root, or run '
            "agentvm-supervise as an unprivileged user",
        )
    if euid != 0 and mapping is UidMapping.TRANSLATE:
        raise SupervisorError(
            f"share '{share.tag}' (shares[{index}]) asks for uid-mapping = \"translate\", which maps "
            'guest ids to arbitrary host ids and needs root: use "user-namespace" (or "auto") as an '
            "unprivileged user",
        )
    if euid == 0:
        host_uid = share.host_uid if share.host_uid is not None else owner.st_uid
        host_gid = share.host_gid if share.host_gid is not None else owner.st_gid
    else:
        host_uid, host_gid = os.geteuid(), os.getegid()
    return ShareIds(
        mapping=mapping,
        guest_uid=share.guest_uid,
        guest_gid=share.guest_gid,
        host_uid=host_uid,
        host_gid=host_gid,
    )


def _check_source(share: Share, index: int) -> Path:
    source = Path(share.source).expanduser()
    if not source.is_absolute():
        raise SupervisorError(
            f"share '{share.tag}' (shares[{index}].source) is the relative path '{share.source}': "
            "give an absolute path",
        )
    if source.exists() and not source.is_dir():
        raise SupervisorError(
            f"share '{share.tag}': {source} is not a directory: point shares[{index}].source at a directory",
            exit_code=ExitCode.NO_INPUT,
        )
    if not source.exists() and not share.create:
        raise SupervisorError(
            f"share '{share.tag}': the directory {source} does not exist: create it, or fix "
            f"shares[{index}].source (or --work-dir) to name an existing directory",
            exit_code=ExitCode.NO_INPUT,
        )
    return source.resolve() if source.exists() else source


def build_plan(
    config: Config,
    *,
    env: Mapping[str, str],
    cwd: Path,
    command: Sequence[str] | None,
    terminal_size: tuple[int, int] | None = None,
    kvm_assessment: kvm.KvmAssessment | None = None,
) -> Plan:
    euid = os.geteuid()
    console_plan = console_settings(config.console, env)
    work_dir: Path | None = None
    if config.shares is None or config.work_dir is not None:
        raw_work = Path(config.work_dir).expanduser() if config.work_dir else cwd
        if not raw_work.is_absolute():
            raw_work = cwd / raw_work
        if not raw_work.is_dir():
            raise SupervisorError(
                f"the work dir {raw_work} does not exist or is not a directory: pass an existing "
                "directory with --work-dir (or work-dir in the config)",
                exit_code=ExitCode.NO_INPUT,
            )
        work_dir = raw_work.resolve()
    if config.shares is None:
        assert work_dir is not None
        agent_home = (
            Path(config.agent_home).expanduser() if config.agent_home else default_agent_home(work_dir, env)
        )
        shares_config = _default_shares(work_dir, agent_home)
    else:
        shares_config = list(config.shares)
    if not shares_config:
        raise SupervisorError("the config lists no shares: add at least one [[shares]] entry")

    base = Path(config.runtime_dir) if config.runtime_dir else runtime.default_base(env, euid)
    if not base.is_absolute():
        raise SupervisorError(f"runtime-dir '{base}' is relative: give an absolute path")
    instance = runtime.new_instance_id(config.name)
    instance_dir = base / instance

    owner_path = work_dir
    seen: set[str] = set()
    shares: list[ShareSpec] = []
    for index, share in enumerate(shares_config):
        if share.tag in seen:
            raise SupervisorError(f"two shares use the tag '{share.tag}': every share needs its own tag")
        seen.add(share.tag)
        source = _check_source(share, index)
        owner = (owner_path or (source if source.exists() else source.parent)).stat()
        ids = _resolve_ids(share, index, source, owner, euid)
        socket_path = instance_dir / f"{share.tag}.sock"
        runtime.check_socket_path(socket_path, f"share '{share.tag}'")
        shares.append(
            ShareSpec(
                tag=share.tag,
                source=source,
                guest_path=share.guest_path or f"/mnt/{share.tag}",
                read_only=share.read_only,
                ids=ids,
                xattr=share.xattr,
                xattrmap=share.xattrmap,
                cache=share.cache,
                socket_path=socket_path,
            )
        )
    runtime.check_socket_path(instance_dir / "qmp.sock", "QMP")
    runtime.check_socket_path(instance_dir / "console.sock", "the console")

    qemu_binary = _find_binary(
        config.qemu.binary,
        "the QEMU binary",
        "install QEMU (apt-get install qemu-system-x86) or set qemu.binary / --qemu",
    )
    assessment = kvm_assessment if kvm_assessment is not None else kvm.assess_kvm()
    accel, accel_reason = kvm.choose_accel(config.qemu.accel, assessment)
    cpu = config.qemu.cpu or ("host" if accel is Accel.KVM else "max")

    builtin = config.qemu.kernel is None
    if not builtin and command:
        raise SupervisorError(
            "a guest command (after --) needs the built-in guest, which knows how to run it and report "
            "its status; with your own qemu.kernel, put the command in the guest's own configuration",
        )
    assets: guest.GuestAssets | None = None
    virtiofsd_name = config.virtiofsd.binary
    if builtin or virtiofsd_name is None:
        if virtiofsd_name is None and not builtin and shutil.which("virtiofsd"):
            virtiofsd_name = "virtiofsd"
        else:
            assets = guest.ensure_assets(env)
    if virtiofsd_name is None:
        assert assets is not None
        virtiofsd_name = str(assets.virtiofsd)
    virtiofsd_binary = _find_binary(
        virtiofsd_name,
        "the virtiofsd binary",
        "install virtiofsd >= 1.10 (Rust) or set virtiofsd.binary / --virtiofsd",
    )

    initrd: Path | None
    if builtin:
        assert assets is not None
        kernel, initrd = assets.kernel, assets.initrd
        first = shares[0].ids
        cmdline = guest.guest_cmdline(
            mounts=[(share.tag, share.guest_path) for share in shares],
            command=list(command) if command else None,
            guest_uid=first.guest_uid,
            guest_gid=first.guest_gid,
            term=env.get("TERM"),
            rows=terminal_size[0] if terminal_size else None,
            cols=terminal_size[1] if terminal_size else None,
            extra=config.qemu.cmdline,
        )
    else:
        kernel = Path(str(config.qemu.kernel)).expanduser()
        initrd = Path(config.qemu.initrd).expanduser() if config.qemu.initrd else None
        for what, maybe in (("qemu.kernel", kernel), ("qemu.initrd", initrd)):
            if maybe is not None and not maybe.is_file():
                raise SupervisorError(
                    f"{what} {maybe} does not exist: fix the path in the config",
                    exit_code=ExitCode.NO_INPUT,
                )
        cmdline = config.qemu.cmdline

    return Plan(
        instance=instance,
        instance_dir=instance_dir,
        base_dir=base,
        shares=shares,
        virtiofsd_binary=virtiofsd_binary,
        socket_mode=config.virtiofsd.socket_mode,
        sandbox=config.virtiofsd.sandbox,
        virtiofsd_extra_args=list(config.virtiofsd.extra_args),
        qemu_binary=qemu_binary,
        machine=config.qemu.machine.value,
        accel=accel,
        accel_reason=accel_reason,
        cpu=cpu,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        memory_mib=config.qemu.memory_mib,
        vcpus=config.qemu.vcpus,
        qemu_extra_args=list(config.qemu.extra_args),
        builtin_guest=builtin,
        command=list(command) if command else None,
        timeouts=config.timeouts,
        work_dir=work_dir,
        console=console_plan,
    )
