"""From configuration to a checked plan: everything `run` needs, validated before anything starts.

This is where the filesystem and the environment are looked at (config.py does neither): share
directories and the uid mapping here, then the environment's preconditions (binaries, /dev/kvm,
namespaces, socket path lengths, ...) as `checks`, which `doctor` lists in the same order. Every
failure here is a SupervisorError raised while nothing exists yet, so a bad input leaves nothing
behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from supervisor import (
    agentguest,
    checks,
    devallow,
    egress,
    guest,
    kvm,
    launcher,
    microvm_runner,
    network,
    runtime,
    sharedirs,
    sshkeys,
    tap,
    xdg,
)
from supervisor.config import (
    Accel,
    Agent,
    Config,
    ConsoleConfig,
    GuestKind,
    Hypervisor,
    Machine,
    NetworkMode,
    Share,
    SocketMode,
    Timeouts,
    UidMapping,
)
from supervisor.console.settings import ConsoleSettings, parse_escape_key
from supervisor.errors import ExitCode, SupervisorError
from supervisor.facts import Facts, facts_dir
from supervisor.launcher import default_agent_home, project_basename
from supervisor.qemu import SANDBOX, QemuSpec, host_tsc_khz, sandbox_options
from supervisor.virtiofsd import CRI_STORAGE_XATTRMAP, ShareIds, ShareSpec, virtiofsd_argv

__all__ = ["Plan", "build_plan", "default_agent_home", "project_basename"]

DEFAULT_MEMORY_MIB = 512
DEFAULT_VCPUS = 1


@dataclass(frozen=True, kw_only=True)
class Plan:
    instance: str
    instance_dir: Path
    base_dir: Path
    shares: tuple[ShareSpec, ...]
    virtiofsd_binary: str
    socket_mode: SocketMode
    sandbox: str
    virtiofsd_extra_args: tuple[str, ...]
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
    qemu_extra_args: tuple[str, ...]
    builtin_guest: bool
    command: tuple[str, ...] | None
    timeouts: Timeouts
    work_dir: Path | None
    agent: Agent = Agent.CLAUDE
    agent_home: Path | None = None  # the default layout's agent home: .microvm-env and the dev shell go here
    env_file: launcher.EnvFile | None = None
    devshell: launcher.Devshell | None = None
    forwards: tuple[launcher.Forward, ...] = ()
    network: network.GuestNetwork | None = None  # our own QEMU's NIC (a runner brings its own)
    runner: microvm_runner.RunnerPlan | None = None  # a microvm.nix runner instead of our own QEMU command
    notes: tuple[str, ...] = ()  # warnings to log when the instance starts
    kvm_device: Path = kvm.DEFAULT_DEVICE  # what the supervisor checks and watches; QEMU opens /dev/kvm
    checks: tuple[checks.Check, ...] = ()  # the preflight, warnings included
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    qemu_sandbox: str | None = SANDBOX  # -sandbox's options (qemu.sandbox_options); None: off
    egress: egress.NetworkPlan = field(default_factory=egress.NetworkPlan.legacy)  # mode, policy, proxy
    ssh: sshkeys.SshPlan | None = None  # the built-in guest's SSH server and its host key dir

    runner_taps: tuple[tap.TapSpec, ...] = ()  # a microvm.nix runner's taps, made before it starts

    @property
    def taps(self) -> tuple[tap.TapSpec, ...]:
        """The taps the supervisor creates on the host for this instance (tap.attached)."""
        own = self.network.tap.tap if self.network is not None and self.network.tap is not None else None
        return (own,) if own is not None else self.runner_taps

    @property
    def hypervisor(self) -> Hypervisor:
        """What runs the VM: our own QEMU, or a microvm.nix runner's hypervisor."""
        return self.runner.hypervisor if self.runner is not None else Hypervisor.QEMU

    @property
    def files(self) -> runtime.InstanceDir:
        return runtime.InstanceDir(self.instance_dir)

    @property
    def qmp_socket(self) -> Path:
        return self.files.qmp_socket

    @property
    def console_socket(self) -> Path:
        return self.files.console_socket

    @property
    def control_socket(self) -> Path:
        return self.files.control_socket

    def qemu_spec(
        self, *, private_qmp_fd: int, public_qmp_fd: int, status_fd: int, resize_fd: int | None = None
    ) -> QemuSpec:
        """The inputs of our own QEMU command line (built-in guest or qemu.kernel, not a runner
        script); only the fds QEMU inherits are decided at spawn time."""
        if self.kernel is None:
            raise ValueError("a microvm.nix runner brings its own QEMU command line")
        return QemuSpec(
            binary=self.qemu_binary,
            instance=self.instance,
            machine=Machine(self.machine),
            accel=self.accel,
            cpu=self.cpu,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline,
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            shares=[(share.tag, share.socket_path) for share in self.shares],
            private_qmp_fd=private_qmp_fd,
            public_qmp_fd=public_qmp_fd,
            status_fd=status_fd,
            extra_args=list(self.qemu_extra_args),
            network=self.network,
            resize_fd=resize_fd,
            sandbox=self.qemu_sandbox,
        )


def default_console_log_dir(env: Mapping[str, str]) -> Path:
    return xdg.base("XDG_STATE_HOME", env) / xdg.APP / "console"


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


def _lexical_source(share: Share, index: int) -> Path:
    source = Path(share.source).expanduser()
    if not source.is_absolute():
        raise SupervisorError(
            f"share '{share.tag}' (shares[{index}].source) is the relative path '{share.source}': "
            "give an absolute path",
        )
    return Path(os.path.normpath(source))


def _check_source(share: Share, index: int, lexical: Path, others: Sequence[Path]) -> Path:
    """The share's directory as a path with no symlink in it (see sharedirs), checked to exist."""
    guarded = [*others, *(Path(os.path.realpath(other)) for other in others)]
    source = sharedirs.physical_source(share.tag, lexical, guarded)
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
    return source


def _guest_writable_parent(source: Path, shares: Sequence[ShareSpec]) -> ShareSpec | None:
    """The share (not read-only) whose directory holds `source`, if any: the guest could write there."""
    return next(
        (
            s
            for s in shares
            if not s.read_only and s.source != source and sharedirs.is_within(source, s.source)
        ),
        None,
    )


def _with_owner_check(share: ShareSpec, shares: Sequence[ShareSpec]) -> ShareSpec:
    outer = _guest_writable_parent(share.source, shares)
    return share if outer is None else replace(share, inside_share_of_uid=outer.ids.host_uid)


def _nearest_existing(path: Path) -> Path:
    """`path`, or the closest ancestor that exists: whose owner a share created below it gets."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _microvm_tsc_hint(machine: Machine) -> str:
    khz = host_tsc_khz() if machine is Machine.MICROVM else None
    return f"tsc_early_khz={khz}" if khz else ""


@dataclass(frozen=True, kw_only=True)
class _Inputs:
    """What every guest mode plans from: the checked inputs shared by the three."""

    env: Mapping[str, str]
    cwd: Path
    euid: int
    console: ConsoleSettings
    work_dir: Path | None
    agent_home: Path | None
    default_layout: Mapping[str, Share]  # the launcher's layout (work, agent-home, cri-storage)
    base: Path
    instance: str
    forwards: tuple[launcher.Forward, ...]
    kvm_device: Path
    kvm_rows: tuple[checks.Check, ...]  # into the preflight after the input checks, as `doctor` lists them
    chosen_accel: Accel | None  # None only in a lenient preflight, which already has the failure
    accel: Accel
    accel_reason: str
    prefix: str  # the VM's name, without the instance's random part (tap and SSH key names)
    egress: egress.NetworkPlan  # the network mode, and the allow-list's policy and proxy socket
    notes: tuple[str, ...] = ()  # warnings to log when the instance starts

    @property
    def instance_dir(self) -> Path:
        return self.base / self.instance


@dataclass(frozen=True, kw_only=True)
class _Guest:
    """What a guest mode decides: how the VM is run and what it boots."""

    builtin: bool
    runner: microvm_runner.RunnerPlan | None
    cmdline: str
    kernel: Path | None
    initrd: Path | None
    command: tuple[str, ...] | None
    network: network.GuestNetwork | None  # our own QEMU's NIC (a runner brings its own)
    ssh: sshkeys.SshPlan | None = None
    runner_taps: tuple[tap.TapSpec, ...] = ()
    qemu_args: tuple[str, ...] = ()  # the agent guest's root image disk (agentguest.py)
    memory_mib: int = DEFAULT_MEMORY_MIB  # defaults of the mode; the config's values win
    vcpus: int = DEFAULT_VCPUS


@dataclass(frozen=True)
class _Shares:
    specs: tuple[ShareSpec, ...]
    sockets: tuple[tuple[Path, str], ...]  # every socket path in the instance dir, with what it is
    env_file: launcher.EnvFile | None
    devshell: launcher.Devshell | None
    agent_home: Path | None
    notes: tuple[str, ...]  # e.g. a dev shell refused (devallow)


def build_plan(
    config: Config,
    *,
    env: Mapping[str, str],
    cwd: Path,
    command: Sequence[str] | None,
    terminal_size: tuple[int, int] | None = None,
    preflight: checks.Preflight | None = None,
    kvm_assessment: kvm.KvmAssessment | None = None,
) -> Plan:
    """Check the inputs (each bad one raises at once), then the environment's preconditions.

    The preconditions go through `preflight`: a strict one (the default: `run`) raises the first
    failing check's error; a lenient one (`doctor`) records every check, and the plan it returns
    only serves that report. Each guest mode is planned by a function of its own.
    """
    preflight = preflight if preflight is not None else checks.Preflight(strict=True)
    inputs = _inputs(config, env=env, cwd=cwd, kvm_assessment=kvm_assessment)
    if config.guest is GuestKind.AGENT and (config.runner is not None or config.qemu.kernel is not None):
        raise SupervisorError(
            'guest = "agent" (or --guest agent) boots our own QEMU with the agent guest, but the config '
            "also names a runner or a qemu.kernel: remove one of them (or pass --guest builtin)",
        )
    if config.runner is not None:
        return _plan_microvm_runner(config, inputs, command, preflight, kvm_assessment)
    if config.qemu.kernel is not None:
        return _plan_own_kernel(config, inputs, command, preflight)
    return _plan_builtin_guest(config, inputs, command, terminal_size, preflight)


def _plan_builtin_guest(
    config: Config,
    inputs: _Inputs,
    command: Sequence[str] | None,
    terminal_size: tuple[int, int] | None,
    preflight: checks.Preflight,
) -> Plan:
    """Our own guest (guest/): it mounts the shares, runs the command, reports its status."""
    ssh_plan = _ssh(config, inputs, builtin=True)
    shares_config = _configured_shares(config, inputs)
    if ssh_plan is not None:  # the host key dir, shared read-only at /etc/ssh/host-keys
        shares_config = [*shares_config, ssh_plan.share()]
    shares = _plan_shares(config, inputs, shares_config)
    guest_net = _guest_network(config, inputs, builtin=True)
    net_args = guest_net.kernel_args() if guest_net is not None else []  # network.py: eth0 in the guest
    ssh_args = ssh_plan.kernel_args() if ssh_plan is not None else []
    extra = [
        _microvm_tsc_hint(config.qemu.machine),
        *net_args,
        *ssh_args,
        inputs.egress.guest_cmdline(),
        config.qemu.cmdline,
    ]
    first = shares.specs[0].ids
    cmdline = guest.guest_cmdline(
        mounts=[(share.tag, share.guest_path) for share in shares.specs],
        command=list(command) if command else None,
        guest_uid=first.guest_uid,
        guest_gid=first.guest_gid,
        term=inputs.env.get("TERM"),
        rows=terminal_size[0] if terminal_size else None,
        cols=terminal_size[1] if terminal_size else None,
        extra=" ".join(filter(None, extra)),
    )
    checked = _check_environment(config, inputs, shares, preflight, builtin=True, runner=None)
    assets = checked.assets
    if assets is None:  # lenient preflight without a built guest: where it will be
        assets = guest.GuestAssets(guest.cache_root(inputs.env) / f"guest-{guest.assets_hash()}")
    planned = _Guest(
        builtin=True,
        runner=None,
        cmdline=cmdline,
        kernel=assets.kernel,
        initrd=assets.initrd,
        command=tuple(command) if command else None,
        network=guest_net,
        ssh=ssh_plan,
    )
    if config.guest is GuestKind.AGENT:  # the same host contract, another kernel, initramfs and root
        agent_plan = agentguest.plan_guest(config.agent, inputs.env, config.qemu.machine, preflight=preflight)
        planned = replace(
            planned,
            kernel=agent_plan.kernel,
            initrd=agent_plan.initrd,
            qemu_args=tuple(agent_plan.qemu_args),
            memory_mib=agent_plan.memory_mib,
            vcpus=agent_plan.vcpus,
        )
    return _assemble(config, inputs, planned=planned, shares=shares, checked=checked, preflight=preflight)


def _plan_own_kernel(
    config: Config, inputs: _Inputs, command: Sequence[str] | None, preflight: checks.Preflight
) -> Plan:
    """qemu.kernel (and qemu.initrd): our QEMU command line, the guest's own userland."""
    shares = _plan_shares(config, inputs, _configured_shares(config, inputs))
    if command:
        raise SupervisorError(
            "a guest command (after --) needs the built-in guest, which knows how to run it and report "
            "its status; with your own qemu.kernel, put the command in the guest's own configuration",
        )
    _ssh(config, inputs, builtin=False)  # only to refuse ssh.enable: the guest runs its own server
    guest_net = _guest_network(config, inputs, builtin=False)
    for what, maybe in (("qemu.kernel", config.qemu.kernel), ("qemu.initrd", config.qemu.initrd)):
        if maybe is not None and not Path(maybe).expanduser().is_file():
            raise SupervisorError(
                f"{what} {Path(maybe).expanduser()} does not exist: fix the path in the config",
                exit_code=ExitCode.NO_INPUT,
            )
    checked = _check_environment(config, inputs, shares, preflight, builtin=False, runner=None)
    planned = _Guest(
        builtin=False,
        runner=None,
        cmdline=config.qemu.cmdline,
        kernel=Path(str(config.qemu.kernel)).expanduser(),
        initrd=Path(config.qemu.initrd).expanduser() if config.qemu.initrd else None,
        command=None,
        network=guest_net,
    )
    return _assemble(config, inputs, planned=planned, shares=shares, checked=checked, preflight=preflight)


def _plan_microvm_runner(
    config: Config,
    inputs: _Inputs,
    command: Sequence[str] | None,
    preflight: checks.Preflight,
    kvm_assessment: kvm.KvmAssessment | None,
) -> Plan:
    """A microvm.nix runner: its script, rewritten for this instance, runs its own hypervisor."""
    assert config.runner is not None
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
    script = microvm_runner.read_script(config.runner.script, inputs.cwd)
    hypervisor = microvm_runner.detect_hypervisor(script, config.runner.hypervisor)
    if hypervisor is not Hypervisor.QEMU:
        assessment = kvm_assessment if kvm_assessment is not None else kvm.assess_kvm(inputs.kvm_device)
        accel, reason, note = _runner_accel(config, assessment)
        inputs = replace(inputs, accel=accel, accel_reason=reason, notes=(*inputs.notes, *note))
    runner_plan = microvm_runner.plan_runner(
        script,
        hypervisor,
        inputs.instance_dir,
        microvm_runner.Overrides(
            instance=inputs.instance,
            accel=inputs.accel,
            cpu=config.qemu.cpu,
            memory_mib=config.qemu.memory_mib,
            vcpus=config.qemu.vcpus,
            forwards=list(inputs.forwards),
            cmdline=config.qemu.cmdline,
            tsc_khz=host_tsc_khz(),
            netdev_extra=tuple(inputs.egress.netdev_extra() or ()),
        ),
        _runner_cwd(config.runner.cwd, inputs.cwd),
    )
    inputs = replace(inputs, notes=(*inputs.notes, *runner_plan.notes))
    _ssh(config, inputs, builtin=False)  # only to refuse ssh.enable: the runner's guest has its own
    runner_taps = network.plan_runner_taps(config.network, list(runner_plan.taps))
    declared = microvm_runner.declared_sources(script)
    shares = _plan_shares(
        config, inputs, _runner_shares(config, runner_plan, inputs.default_layout, declared)
    )
    checked = _check_environment(config, inputs, shares, preflight, builtin=False, runner=runner_plan)
    planned = _Guest(
        builtin=False,
        runner=runner_plan,
        cmdline="",
        kernel=None,
        initrd=None,
        command=None,
        network=None,
        runner_taps=runner_taps,
    )
    return _assemble(config, inputs, planned=planned, shares=shares, checked=checked, preflight=preflight)


# ---- the shared parts --------------------------------------------------------------------------


def _ssh(config: Config, inputs: _Inputs, *, builtin: bool) -> sshkeys.SshPlan | None:
    tap_network = config.network.mode is NetworkMode.TAP
    return sshkeys.plan_ssh(config.ssh, inputs.env, inputs.prefix, tap_network=tap_network, builtin=builtin)


def _guest_network(config: Config, inputs: _Inputs, *, builtin: bool) -> network.GuestNetwork | None:
    """Our QEMU's NIC: the mode's netdev (egress), or a tap on the bridge (tap.py)."""
    return network.plan_network(
        inputs.forwards,
        builtin_guest=builtin,
        egress=inputs.egress.netdev_extra(),
        config=config.network,
        vm_name=inputs.prefix,
    )


def _inputs(
    config: Config, *, env: Mapping[str, str], cwd: Path, kvm_assessment: kvm.KvmAssessment | None
) -> _Inputs:
    euid = os.geteuid()
    console_plan = console_settings(config.console, env)
    work_dir = _work_dir(config, env, cwd)
    default_layout: dict[str, Share] = {}
    agent_home: Path | None = None
    if work_dir is not None and (config.shares is None or config.runner is not None):
        agent_home = launcher.resolve_agent_home(
            config.agent_home, env, work_dir=work_dir, agent=config.agent, cwd=cwd
        )
        default_layout = {share.tag: share for share in _default_shares(work_dir, agent_home)}
    base = Path(config.runtime_dir) if config.runtime_dir else runtime.default_base(env, euid)
    if not base.is_absolute():
        raise SupervisorError(f"runtime-dir '{base}' is relative: give an absolute path")
    prefix = config.name or launcher.instance_prefix(work_dir or cwd.resolve(), config.agent)
    forwards = launcher.parse_forwards(config.forwards)
    # The KVM rows are worked out now (a runner is rewritten for the accelerator) but go into the
    # preflight after the input checks, in the order `doctor` lists them.
    kvm_device = Path(config.qemu.kvm_device).expanduser()
    kvm_rows, chosen_accel, accel_reason = checks.kvm_checks(kvm_device, config.qemu.accel, kvm_assessment)
    instance = runtime.new_instance_id(prefix)
    egress_plan = egress.plan_network(
        config.network,
        agent=config.agent,
        agent_guest=config.guest is GuestKind.AGENT,  # allowlist by default
        runner=config.runner is not None,
        instance=instance,
        instance_dir=base / instance,
        forwards=len(forwards),
        env=env,
    )
    return _Inputs(
        env=env,
        cwd=cwd,
        euid=euid,
        console=console_plan,
        work_dir=work_dir,
        agent_home=agent_home,
        default_layout=default_layout,
        base=base,
        instance=instance,
        forwards=tuple(forwards),
        kvm_device=kvm_device,
        kvm_rows=tuple(kvm_rows),
        chosen_accel=chosen_accel,
        accel=chosen_accel or Accel.TCG,
        accel_reason=accel_reason,
        prefix=prefix,
        egress=egress_plan,
    )


def _work_dir(config: Config, env: Mapping[str, str], cwd: Path) -> Path | None:
    """The project dir: needed by the launcher's layout, a runner, or when named explicitly."""
    work_raw, work_named_by = launcher.work_dir_source(config.work_dir, env)
    if not (config.shares is None or config.runner is not None or work_raw is not None):
        return None
    raw_work = Path(work_raw).expanduser() if work_raw else cwd
    if not raw_work.is_absolute():
        raw_work = cwd / raw_work
    if not raw_work.is_dir():
        raise SupervisorError(
            f"the work dir {raw_work} (from {work_named_by}) does not exist or is not a directory: "
            "pass an existing directory with --work-dir, work-dir in the config, or WORK_DIR",
            exit_code=ExitCode.NO_INPUT,
        )
    return raw_work.resolve()


def _configured_shares(config: Config, inputs: _Inputs) -> list[Share]:
    shares = list(inputs.default_layout.values()) if config.shares is None else list(config.shares)
    if not shares:
        raise SupervisorError("the config lists no shares: add at least one [[shares]] entry")
    return shares


def _plan_shares(config: Config, inputs: _Inputs, shares_config: Sequence[Share]) -> _Shares:
    """Each share checked and resolved (no symlink in its path, see sharedirs), with its socket."""
    files = runtime.InstanceDir(inputs.instance_dir)
    seen: set[str] = set()
    specs: list[ShareSpec] = []
    lexical = [_lexical_source(share, index) for index, share in enumerate(shares_config)]
    for index, share in enumerate(shares_config):
        if share.tag in seen:
            raise SupervisorError(f"two shares use the tag '{share.tag}': every share needs its own tag")
        seen.add(share.tag)
        source = _check_source(share, index, lexical[index], lexical[:index] + lexical[index + 1 :])
        owner = (inputs.work_dir or _nearest_existing(source)).stat()
        specs.append(
            ShareSpec(
                tag=share.tag,
                source=source,
                guest_path=share.guest_path or f"/mnt/{share.tag}",
                read_only=share.read_only,
                ids=_resolve_ids(share, index, source, owner, inputs.euid),
                xattr=share.xattr,
                xattrmap=share.xattrmap,
                cache=share.cache,
                socket_path=files.share_socket(share.tag),
                create=share.create,
            )
        )
    specs = [_with_owner_check(share, specs) for share in specs]
    sockets = [(share.socket_path, f"share '{share.tag}'") for share in specs] + files.named_sockets()
    env_file, devshell, agent_home, notes = _launcher_files(config, inputs, shares_config, specs)
    return _Shares(tuple(specs), tuple(sockets), env_file, devshell, agent_home, notes)


def _launcher_files(
    config: Config, inputs: _Inputs, shares_config: Sequence[Share], specs: Sequence[ShareSpec]
) -> tuple[launcher.EnvFile | None, launcher.Devshell | None, Path | None, tuple[str, ...]]:
    """The launcher's files go to the agent home only when it is what the guest mounts at agent-home."""
    layout_home = inputs.default_layout.get("agent-home")
    uses_layout_home = any(share is layout_home for share in shares_config)
    home_share = next((s for s in specs if uses_layout_home and s.tag == "agent-home"), None)
    agent_home, work_dir = inputs.agent_home, inputs.work_dir
    if home_share is None or agent_home is None or work_dir is None:
        return None, None, None, ()
    owner_ids = (home_share.ids.host_uid, home_share.ids.host_gid) if inputs.euid == 0 else None
    agent_home = home_share.source  # the link-free path of the directory the guest mounts
    proxy_env = sorted(inputs.egress.guest_env().items())  # a runner's guest reads it from .microvm-env
    env_file = launcher.plan_env_file(agent_home, inputs.env, config.agent, owner_ids, extra=proxy_env)
    devshell = launcher.plan_devshell(
        work_dir, agent_home, launcher.child_environment(inputs.env, {}), owner_ids
    )
    refused = devallow.refusal(work_dir, inputs.env) if devshell is not None else None
    if refused is not None:  # the guest can edit the Nix code the host would evaluate
        return env_file, None, agent_home, (refused,)
    return env_file, devshell, agent_home, ()


@dataclass(frozen=True)
class _Environment:
    """What the preflight found: the binaries to run and the sandbox virtiofsd gets."""

    shares: tuple[ShareSpec, ...]  # without a user namespace when the sandbox fell back
    sandbox: str
    virtiofsd_binary: str
    qemu_binary: str
    assets: guest.GuestAssets | None


def _check_environment(
    config: Config,
    inputs: _Inputs,
    shares: _Shares,
    preflight: checks.Preflight,
    *,
    builtin: bool,
    runner: microvm_runner.RunnerPlan | None,
) -> _Environment:
    """The environment's preconditions, in the order `doctor` lists them."""
    known = Facts(facts_dir(inputs.env), store=preflight.strict)  # doctor reads, never writes
    for row in inputs.kvm_rows:
        preflight.add(row)
    euid = inputs.euid
    sandbox = config.virtiofsd.sandbox
    specs = shares.specs
    fallback_sandbox = "chroot" if euid == 0 else "none"  # chroot needs CAP_SYS_CHROOT
    namespaces = preflight.add(
        checks.check_namespaces(
            needed=sandbox == "namespace",
            euid=euid,
            allow_fallback=config.virtiofsd.sandbox_fallback,
            fallback_sandbox=fallback_sandbox,
            known=known,
        )
    )
    if namespaces.facts.get("fallback"):
        sandbox = fallback_sandbox
        specs = tuple(_without_user_namespace(share) for share in specs)
    preflight.add(checks.check_pidfd())
    preflight.add(checks.check_id_maps(config.virtiofsd.extra_args, euid))
    virtiofsd_binary, assets = _check_virtiofsd(
        config, inputs, specs, sandbox, preflight, builtin=builtin, known=known
    )
    if runner is None:
        row = preflight.add(
            checks.check_qemu(config.qemu.binary, config.qemu.machine, inputs.chosen_accel, known=known)
        )
        qemu_binary = str(row.facts.get("path") or config.qemu.binary)
        preflight.add(
            checks.check_qemu_sandbox(qemu_binary, enabled=config.qemu.sandbox, qemu_ok=row, known=known)
        )
    else:
        qemu_binary = runner.script.program
        preflight.add(
            checks.skip("qemu", f"the runner {runner.script.path} brings its own hypervisor ({qemu_binary})")
        )
    preflight.add(egress.check_egress(inputs.egress))
    preflight.add(checks.check_memfd())
    preflight.add(checks.check_runtime_dir(inputs.base))
    preflight.add(checks.check_socket_paths(list(shares.sockets)))
    return _Environment(specs, sandbox, virtiofsd_binary, qemu_binary, assets)


def _check_virtiofsd(
    config: Config,
    inputs: _Inputs,
    specs: Sequence[ShareSpec],
    sandbox: str,
    preflight: checks.Preflight,
    *,
    builtin: bool,
    known: Facts,
) -> tuple[str, guest.GuestAssets | None]:
    """The virtiofsd to run: the configured one, the built-in guest's, or one on PATH."""
    assets: guest.GuestAssets | None = None
    virtiofsd_name = config.virtiofsd.binary
    if builtin or virtiofsd_name is None:
        if virtiofsd_name is None and not builtin and shutil.which("virtiofsd"):
            virtiofsd_name = "virtiofsd"
        else:
            row, assets = checks.check_guest(inputs.env, build=preflight.strict)
            preflight.add(row)
    if virtiofsd_name is None and assets is not None:
        virtiofsd_name = str(assets.virtiofsd)
    if virtiofsd_name is None:
        preflight.add(checks.skip("virtiofsd", "the built-in guest's virtiofsd comes with the guest build"))
        return "virtiofsd", assets
    needed = _virtiofsd_flags_used(
        specs,
        socket_mode=config.virtiofsd.socket_mode,
        sandbox=sandbox,
        extra_args=config.virtiofsd.extra_args,
    )
    row = preflight.add(checks.check_virtiofsd(virtiofsd_name, needed, known=known))
    return str(row.facts.get("path") or virtiofsd_name), assets


def _assemble(
    config: Config,
    inputs: _Inputs,
    *,
    planned: _Guest,
    shares: _Shares,
    checked: _Environment,
    preflight: checks.Preflight,
) -> Plan:
    return Plan(
        instance=inputs.instance,
        instance_dir=inputs.instance_dir,
        base_dir=inputs.base,
        shares=checked.shares,
        virtiofsd_binary=checked.virtiofsd_binary,
        socket_mode=config.virtiofsd.socket_mode,
        sandbox=checked.sandbox,
        virtiofsd_extra_args=tuple(config.virtiofsd.extra_args),
        qemu_binary=checked.qemu_binary,
        machine=config.qemu.machine.value,
        accel=inputs.accel,
        accel_reason=inputs.accel_reason,
        cpu=config.qemu.cpu or ("host" if inputs.accel is Accel.KVM else "max"),
        kernel=planned.kernel,
        initrd=planned.initrd,
        cmdline=planned.cmdline,
        memory_mib=config.qemu.memory_mib or planned.memory_mib,
        vcpus=config.qemu.vcpus or planned.vcpus,
        qemu_extra_args=(*planned.qemu_args, *config.qemu.extra_args),
        builtin_guest=planned.builtin,
        command=planned.command,
        timeouts=config.timeouts,
        work_dir=inputs.work_dir,
        agent=config.agent,
        agent_home=shares.agent_home,
        env_file=shares.env_file,
        devshell=shares.devshell,
        forwards=inputs.forwards,
        network=planned.network,
        egress=inputs.egress,
        runner=planned.runner,
        notes=(*inputs.notes, *shares.notes),
        kvm_device=inputs.kvm_device,
        checks=tuple(preflight.checks),
        console=inputs.console,
        qemu_sandbox=sandbox_options(spawn=inputs.egress.needs_spawn) if config.qemu.sandbox else None,
        ssh=planned.ssh,
        runner_taps=planned.runner_taps,
    )


def _runner_accel(config: Config, assessment: kvm.KvmAssessment) -> tuple[Accel, str, tuple[str, ...]]:
    """cloud-hypervisor has no TCG to fall back to (QEMU runners choose like our own QEMU)."""
    if config.qemu.accel is Accel.TCG:
        raise SupervisorError(
            'accel = "tcg" was requested, but the runner runs cloud-hypervisor, which needs KVM: use '
            '--accel auto (or kvm), or build the VM with microvm.hypervisor = "qemu"',
            exit_code=ExitCode.UNAVAILABLE,
        )
    notes: tuple[str, ...] = ()
    if not assessment.usable:
        notes = (
            f"cloud-hypervisor needs KVM, and {assessment.reason}; starting it anyway (a guest kernel "
            f"built for this host may still boot). Remedy: {assessment.remedy}",
        )
    return Accel.KVM, "cloud-hypervisor runs on KVM only", notes


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
    planned: microvm_runner.RunnerPlan,
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
