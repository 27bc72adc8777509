"""From configuration to a checked plan: everything `run` needs, validated before anything starts.

This is where the filesystem and the environment are looked at (config.py does neither): share
directories and the uid mapping here, then the environment's preconditions (binaries, /dev/kvm,
namespaces, socket path lengths, ...) as `checks`, which `doctor` lists in the same order. Every
failure here is a SupervisorError raised while nothing exists yet, so a bad input leaves nothing
behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from supervisor import checks, control, guest, kvm, runtime
from supervisor.config import Accel, Config, Machine, Share, SocketMode, Timeouts, UidMapping
from supervisor.errors import ExitCode, SupervisorError
from supervisor.qemu import host_tsc_khz
from supervisor.virtiofsd import CRI_STORAGE_XATTRMAP, ShareIds, ShareSpec, virtiofsd_argv

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
    kvm_device: Path = kvm.DEFAULT_DEVICE  # what the supervisor checks and watches; QEMU opens /dev/kvm
    checks: tuple[checks.Check, ...] = ()  # the preflight, warnings included

    @property
    def qmp_socket(self) -> Path:
        return self.instance_dir / "qmp.sock"

    @property
    def status_file(self) -> Path:
        return self.instance_dir / "guest-status"

    @property
    def control_socket(self) -> Path:
        return self.instance_dir / control.SOCKET_NAME


def project_basename(work_dir: Path) -> str:
    """claude-microvm's <basename>: the dir name's first 12 chars of [A-Za-z0-9_-], or "root"."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "", work_dir.name)[:12]
    return cleaned or "root"


def default_agent_home(work_dir: Path, env: Mapping[str, str], agent: str = DEFAULT_AGENT) -> Path:
    data_home = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "/root")) / ".local" / "share")
    digest = hashlib.sha256(os.fsencode(work_dir)).hexdigest()[:12]
    return Path(data_home) / f"{agent}-microvm" / f"{project_basename(work_dir)}-{digest}"


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


def _without_user_namespace(share: ShareSpec) -> ShareSpec:
    """The sandbox fallback: virtiofsd translates the guest ids itself instead of a user namespace."""
    if share.ids.mapping is not UidMapping.USER_NAMESPACE:
        return share
    return replace(share, ids=replace(share.ids, mapping=UidMapping.TRANSLATE))


def _virtiofsd_flags_used(
    shares: Sequence[ShareSpec], *, socket_mode: SocketMode, sandbox: str, extra_args: Sequence[str]
) -> list[tuple[str, str]]:
    """(flag, share) for every flag the virtiofsd command lines of this plan will carry."""
    used = []
    for share in shares:
        argv = virtiofsd_argv(
            "virtiofsd", share, socket_mode=socket_mode, fd=3, sandbox=sandbox, extra_args=list(extra_args)
        )
        used += [(arg.split("=", 1)[0], f"share '{share.tag}'") for arg in argv[1:] if arg.startswith("--")]
    return used


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


def _microvm_tsc_hint(machine: Machine) -> str:
    khz = host_tsc_khz() if machine is Machine.MICROVM else None
    return f"tsc_early_khz={khz}" if khz else ""


def build_plan(
    config: Config,
    *,
    env: Mapping[str, str],
    cwd: Path,
    command: Sequence[str] | None,
    terminal_size: tuple[int, int] | None = None,
    preflight: checks.Preflight | None = None,
) -> Plan:
    """Check the inputs (each bad one raises at once), then the environment's preconditions.

    The preconditions go through `preflight`: a strict one (the default: `run`) raises the first
    failing check's error; a lenient one (`doctor`) records every check, and the plan it returns
    only serves that report.
    """
    preflight = preflight if preflight is not None else checks.Preflight(strict=True)
    euid = os.geteuid()
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
    sockets: list[tuple[Path, str]] = []
    for index, share in enumerate(shares_config):
        if share.tag in seen:
            raise SupervisorError(f"two shares use the tag '{share.tag}': every share needs its own tag")
        seen.add(share.tag)
        source = _check_source(share, index)
        owner = (owner_path or (source if source.exists() else source.parent)).stat()
        ids = _resolve_ids(share, index, source, owner, euid)
        socket_path = instance_dir / f"{share.tag}.sock"
        sockets.append((socket_path, f"share '{share.tag}'"))
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
    sockets += [
        (instance_dir / "qmp.sock", "QMP"),
        (instance_dir / "console.sock", "the console"),
        (instance_dir / control.SOCKET_NAME, "the control socket"),
    ]

    builtin = config.qemu.kernel is None
    if not builtin and command:
        raise SupervisorError(
            "a guest command (after --) needs the built-in guest, which knows how to run it and report "
            "its status; with your own qemu.kernel, put the command in the guest's own configuration",
        )
    if builtin:
        first = shares[0].ids
        cmdline = guest.guest_cmdline(
            mounts=[(share.tag, share.guest_path) for share in shares],
            command=list(command) if command else None,
            guest_uid=first.guest_uid,
            guest_gid=first.guest_gid,
            term=env.get("TERM"),
            rows=terminal_size[0] if terminal_size else None,
            cols=terminal_size[1] if terminal_size else None,
            extra=" ".join(filter(None, [_microvm_tsc_hint(config.qemu.machine), config.qemu.cmdline])),
        )
    else:
        for what, maybe in (("qemu.kernel", config.qemu.kernel), ("qemu.initrd", config.qemu.initrd)):
            if maybe is not None and not Path(maybe).expanduser().is_file():
                raise SupervisorError(
                    f"{what} {Path(maybe).expanduser()} does not exist: fix the path in the config",
                    exit_code=ExitCode.NO_INPUT,
                )
        cmdline = config.qemu.cmdline

    # The environment's preconditions, in the order `doctor` lists them.
    kvm_device = Path(config.qemu.kvm_device).expanduser()
    rows, chosen_accel, accel_reason = checks.kvm_checks(kvm_device, config.qemu.accel)
    for row in rows:
        preflight.add(row)
    accel = chosen_accel or Accel.TCG  # None only in a lenient preflight, which already has the failure
    sandbox = config.virtiofsd.sandbox
    fallback_sandbox = "chroot" if euid == 0 else "none"  # chroot needs CAP_SYS_CHROOT
    namespaces = preflight.add(
        checks.check_namespaces(
            needed=sandbox == "namespace",
            euid=euid,
            allow_fallback=config.virtiofsd.sandbox_fallback,
            fallback_sandbox=fallback_sandbox,
        )
    )
    if namespaces.facts.get("fallback"):
        sandbox = fallback_sandbox
        shares = [_without_user_namespace(share) for share in shares]
    preflight.add(checks.check_pidfd())
    preflight.add(checks.check_id_maps(config.virtiofsd.extra_args, euid))

    assets: guest.GuestAssets | None = None
    virtiofsd_name = config.virtiofsd.binary
    if builtin or virtiofsd_name is None:
        if virtiofsd_name is None and not builtin and shutil.which("virtiofsd"):
            virtiofsd_name = "virtiofsd"
        else:
            row, assets = checks.check_guest(env, build=preflight.strict)
            preflight.add(row)
    if virtiofsd_name is None and assets is not None:
        virtiofsd_name = str(assets.virtiofsd)
    if virtiofsd_name is None:
        preflight.add(checks.skip("virtiofsd", "the built-in guest's virtiofsd comes with the guest build"))
        virtiofsd_binary = "virtiofsd"
    else:
        needed = _virtiofsd_flags_used(
            shares,
            socket_mode=config.virtiofsd.socket_mode,
            sandbox=sandbox,
            extra_args=config.virtiofsd.extra_args,
        )
        row = preflight.add(checks.check_virtiofsd(virtiofsd_name, needed))
        virtiofsd_binary = str(row.facts.get("path") or virtiofsd_name)
    row = preflight.add(checks.check_qemu(config.qemu.binary, config.qemu.machine, chosen_accel))
    qemu_binary = str(row.facts.get("path") or config.qemu.binary)
    preflight.add(checks.check_memfd())
    preflight.add(checks.check_runtime_dir(base))
    preflight.add(checks.check_socket_paths(sockets))

    cpu = config.qemu.cpu or ("host" if accel is Accel.KVM else "max")
    initrd: Path | None
    if builtin:
        if assets is None:  # lenient preflight without a built guest: where it will be
            assets = guest.GuestAssets(guest.cache_root(env) / f"guest-{guest.assets_hash()}")
        kernel, initrd = assets.kernel, assets.initrd
    else:
        kernel = Path(str(config.qemu.kernel)).expanduser()
        initrd = Path(config.qemu.initrd).expanduser() if config.qemu.initrd else None

    return Plan(
        instance=instance,
        instance_dir=instance_dir,
        base_dir=base,
        shares=shares,
        virtiofsd_binary=virtiofsd_binary,
        socket_mode=config.virtiofsd.socket_mode,
        sandbox=sandbox,
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
        kvm_device=kvm_device,
        checks=tuple(preflight.checks),
    )
