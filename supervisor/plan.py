"""From configuration to a checked plan: everything `run` needs, validated before anything starts.

This is where the filesystem and the environment are looked at (config.py does neither): share
directories, binaries, /dev/kvm, the uid mapping, socket path lengths. Every failure here is a
SupervisorError raised while nothing exists yet, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import guest, kvm, launcher, runner, runtime
from supervisor.config import Accel, Agent, Config, Hypervisor, Share, SocketMode, Timeouts, UidMapping
from supervisor.errors import ExitCode, SupervisorError
from supervisor.launcher import default_agent_home, project_basename
from supervisor.virtiofsd import CRI_STORAGE_XATTRMAP, ShareIds, ShareSpec

__all__ = ["Plan", "build_plan", "default_agent_home", "project_basename"]

DEFAULT_MEMORY_MIB = 512
DEFAULT_VCPUS = 1


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
    kernel: Path | None  # None: a microvm.nix runner brings its own
    initrd: Path | None
    cmdline: str
    memory_mib: int
    vcpus: int
    qemu_extra_args: list[str]
    builtin_guest: bool
    command: list[str] | None
    timeouts: Timeouts
    work_dir: Path | None
    agent: Agent = Agent.CLAUDE
    agent_home: Path | None = None  # the default layout's agent home: .microvm-env and the dev shell go here
    env_file: launcher.EnvFile | None = None
    devshell: launcher.Devshell | None = None
    forwards: list[launcher.Forward] = field(default_factory=list)
    runner: runner.RunnerPlan | None = None  # a microvm.nix runner instead of our own QEMU command
    notes: list[str] = field(default_factory=list)  # warnings to log when the instance starts

    @property
    def qmp_socket(self) -> Path:
        return self.instance_dir / "qmp.sock"

    @property
    def status_file(self) -> Path:
        return self.instance_dir / "guest-status"


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
    agent = config.agent
    work_raw, work_named_by = launcher.work_dir_source(config.work_dir, env)
    work_dir: Path | None = None
    if config.shares is None or config.runner is not None or work_raw is not None:
        raw_work = Path(work_raw).expanduser() if work_raw else cwd
        if not raw_work.is_absolute():
            raw_work = cwd / raw_work
        if not raw_work.is_dir():
            raise SupervisorError(
                f"the work dir {raw_work} (from {work_named_by}) does not exist or is not a directory: "
                "pass an existing directory with --work-dir, work-dir in the config, or WORK_DIR",
                exit_code=ExitCode.NO_INPUT,
            )
        work_dir = raw_work.resolve()
    default_layout: dict[str, Share] = {}
    agent_home: Path | None = None
    if work_dir is not None and (config.shares is None or config.runner is not None):
        agent_home = launcher.resolve_agent_home(
            config.agent_home, env, work_dir=work_dir, agent=agent, cwd=cwd
        )
        default_layout = {share.tag: share for share in _default_shares(work_dir, agent_home)}

    base = Path(config.runtime_dir) if config.runtime_dir else runtime.default_base(env, euid)
    if not base.is_absolute():
        raise SupervisorError(f"runtime-dir '{base}' is relative: give an absolute path")
    prefix = config.name or launcher.instance_prefix(work_dir or cwd.resolve(), agent)
    instance = runtime.new_instance_id(prefix)
    instance_dir = base / instance
    forwards = launcher.parse_forwards(config.forwards)
    assessment = kvm_assessment if kvm_assessment is not None else kvm.assess_kvm()
    notes: list[str] = []

    runner_plan: runner.RunnerPlan | None = None
    if config.runner is not None:
        if command:
            raise SupervisorError(
                "a guest command (after --) needs the built-in guest; a microvm.nix runner runs what its "
                "NixOS configuration says (claude-microvm: the agent, on login)",
            )
        if config.qemu.kernel is not None:
            raise SupervisorError(
                "the config sets both runner.script and qemu.kernel: a microvm.nix runner brings its own "
                "kernel; remove one of them",
            )
        script = runner.read_script(config.runner.script, cwd)
        hypervisor = runner.detect_hypervisor(script, config.runner.hypervisor)
        accel, accel_reason = _runner_accel(config, hypervisor, assessment, notes)
        runner_plan = runner.plan_runner(
            script,
            hypervisor,
            instance_dir,
            runner.Overrides(
                instance=instance,
                accel=accel,
                cpu=config.qemu.cpu,
                memory_mib=config.qemu.memory_mib,
                vcpus=config.qemu.vcpus,
                forwards=forwards,
                cmdline=config.qemu.cmdline,
                tsc_khz=runner.host_tsc_khz(),
            ),
            _runner_cwd(config.runner.cwd, cwd),
        )
        notes += runner_plan.notes
        shares_config = _runner_shares(config, runner_plan, default_layout, runner.declared_sources(script))
    elif config.shares is None:
        shares_config = list(default_layout.values())
    else:
        shares_config = list(config.shares)
    if not shares_config and runner_plan is None:
        raise SupervisorError("the config lists no shares: add at least one [[shares]] entry")

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
    # The launcher's files go to the agent home only when it is what the guest mounts at agent-home.
    layout_home = default_layout.get("agent-home")
    uses_layout_home = any(share is layout_home for share in shares_config)
    home_share = next((s for s in shares if uses_layout_home and s.tag == "agent-home"), None)
    env_file: launcher.EnvFile | None = None
    devshell: launcher.Devshell | None = None
    if home_share is not None and agent_home is not None and work_dir is not None:
        owner_ids = (home_share.ids.host_uid, home_share.ids.host_gid) if euid == 0 else None
        env_file = launcher.plan_env_file(agent_home, env, agent, owner_ids)
        devshell = launcher.plan_devshell(
            work_dir, agent_home, launcher.child_environment(env, {}), owner_ids
        )
    else:
        agent_home = None
    runtime.check_socket_path(instance_dir / runner.API_SOCKET, "the runner's API")
    runtime.check_socket_path(instance_dir / "qmp.sock", "QMP")
    runtime.check_socket_path(instance_dir / "console.sock", "the console")

    if runner_plan is None:
        qemu_binary = _find_binary(
            config.qemu.binary,
            "the QEMU binary",
            "install QEMU (apt-get install qemu-system-x86) or set qemu.binary / --qemu",
        )
        accel, accel_reason = kvm.choose_accel(config.qemu.accel, assessment)
    else:
        qemu_binary = runner_plan.script.program
    cpu = config.qemu.cpu or ("host" if accel is Accel.KVM else "max")

    builtin = config.qemu.kernel is None and runner_plan is None
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

    kernel: Path | None
    initrd: Path | None
    if runner_plan is not None:
        kernel, initrd, cmdline = None, None, ""
    elif builtin:
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
        memory_mib=config.qemu.memory_mib or DEFAULT_MEMORY_MIB,
        vcpus=config.qemu.vcpus or DEFAULT_VCPUS,
        qemu_extra_args=list(config.qemu.extra_args),
        builtin_guest=builtin,
        command=list(command) if command else None,
        timeouts=config.timeouts,
        work_dir=work_dir,
        agent=agent,
        agent_home=agent_home,
        env_file=env_file,
        devshell=devshell,
        forwards=forwards,
        runner=runner_plan,
        notes=notes,
    )


def _runner_accel(
    config: Config, hypervisor: Hypervisor, assessment: kvm.KvmAssessment, notes: list[str]
) -> tuple[Accel, str]:
    """QEMU runners fall back to TCG like our own QEMU; cloud-hypervisor has nothing to fall back to."""
    if hypervisor is Hypervisor.QEMU:
        return kvm.choose_accel(config.qemu.accel, assessment)
    if config.qemu.accel is Accel.TCG:
        raise SupervisorError(
            'accel = "tcg" was requested, but the runner runs cloud-hypervisor, which needs KVM: use '
            '--accel auto (or kvm), or build the VM with microvm.hypervisor = "qemu"',
            exit_code=ExitCode.UNAVAILABLE,
        )
    if not assessment.usable:
        notes.append(
            f"cloud-hypervisor needs KVM, and {assessment.reason}; starting it anyway (a guest kernel "
            f"built for this host may still boot). Remedy: {assessment.remedy}"
        )
    return Accel.KVM, "cloud-hypervisor runs on KVM only"


def _runner_cwd(raw: str | None, cwd: Path) -> Path | None:
    if raw is None:
        return None
    path = Path(raw).expanduser()
    path = path if path.is_absolute() else cwd / path
    if not path.is_dir():
        raise SupervisorError(
            f"runner.cwd {path} is not an existing directory: create it, or leave runner.cwd out to run "
            "the runner in the instance's runtime dir",
            exit_code=ExitCode.NO_INPUT,
        )
    return path.resolve()


def _runner_shares(
    config: Config,
    planned: runner.RunnerPlan,
    default_layout: Mapping[str, Share],
    declared: Mapping[str, str],
) -> list[Share]:
    """Each virtiofs tag of the runner gets its source from, in order: a [[shares]] entry with that
    tag, the launcher's layout (work, agent-home, cri-storage), the source the runner declares."""
    configured = {share.tag: share for share in config.shares or []}
    path = planned.script.path
    unknown = sorted(set(configured) - set(planned.share_tags))
    if unknown:
        raise SupervisorError(
            f"the config has a share '{unknown[0]}' that the runner {path} does not use (its virtiofs "
            f"tags: {', '.join(planned.share_tags) or 'none'}): remove it from [[shares]] or fix its tag",
        )
    result = []
    for tag in planned.share_tags:
        if tag in configured:
            result.append(configured[tag])
        elif tag in default_layout:
            result.append(default_layout[tag])
        elif tag in declared:
            result.append(Share(tag=tag, source=declared[tag]))
        else:
            raise SupervisorError(
                f"the runner {path} has a virtiofs share '{tag}' whose source directory is unknown (no "
                "share/microvm/virtiofs next to its bin/): add a [[shares]] entry with tag = "
                f'"{tag}" and its source',
            )
    return result
