"""Preconditions of a VM start, each one a `Check` with a status and a concrete remedy.

`plan.build_plan` runs them, in one order, through a `Preflight`: for `run` it is strict and the
first failing check stops the start with that check's message (before anything exists); for
`doctor` it collects every check and the report lists them all. So both show the same words, and a
precondition is written once.

Status: ok; warn (the VM can start, but degraded or with a fallback: say so); fail (it cannot);
skip (not needed by this configuration, or not checkable because an earlier check failed).
"""

from __future__ import annotations

import enum
import errno
import os
import pwd
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import msgspec

from supervisor import children, guest, kvm, runtime
from supervisor.config import Accel, Machine
from supervisor.errors import ExitCode, SupervisorError
from supervisor.facts import Facts
from supervisor.qemu import SANDBOX

MIN_VIRTIOFSD = (1, 10)
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
QBOOT_ROM = Path("/usr/share/qemu/qboot.rom")

Fact = str | int | bool | list[str] | None


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


class Check(msgspec.Struct, frozen=True, kw_only=True):
    name: str  # stable, kebab-case: what scripts match on
    status: Status
    summary: str  # what was found, one sentence
    remedy: str = ""  # what to do about it (fail and warn)
    facts: dict[str, Fact] = {}
    exit_code: int = 0  # the status `run` exits with when this check fails

    @property
    def message(self) -> str:
        return f"{self.summary}: {self.remedy}" if self.remedy else self.summary

    def error(self) -> SupervisorError:
        return SupervisorError(self.message, exit_code=ExitCode(self.exit_code or ExitCode.UNAVAILABLE))


def ok(name: str, summary: str, facts: Mapping[str, Fact] | None = None) -> Check:
    return Check(name=name, status=Status.OK, summary=summary, facts=dict(facts or {}))


def warn(name: str, summary: str, remedy: str, facts: Mapping[str, Fact] | None = None) -> Check:
    return Check(name=name, status=Status.WARN, summary=summary, remedy=remedy, facts=dict(facts or {}))


def fail(
    name: str,
    summary: str,
    remedy: str,
    facts: Mapping[str, Fact] | None = None,
    *,
    exit_code: ExitCode = ExitCode.UNAVAILABLE,
) -> Check:
    return Check(
        name=name,
        status=Status.FAIL,
        summary=summary,
        remedy=remedy,
        facts=dict(facts or {}),
        exit_code=exit_code,
    )


def skip(name: str, summary: str, facts: Mapping[str, Fact] | None = None) -> Check:
    return Check(name=name, status=Status.SKIP, summary=summary, facts=dict(facts or {}))


class Preflight:
    """Collects checks; `strict` (run) raises the first failure's error the moment it is added."""

    def __init__(self, *, strict: bool) -> None:
        self.strict = strict
        self.checks: list[Check] = []

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        if self.strict and check.status is Status.FAIL:
            raise check.error()
        return check

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status is Status.FAIL]


# ---- binaries --------------------------------------------------------------------------------


def resolve_binary(name: str, what: str, remedy: str) -> tuple[str | None, str, str]:
    """(absolute path or None, problem, remedy): `name` with a slash is a path, else looked up on PATH."""
    if "/" in name:
        path = Path(name)
        if not path.is_file():
            return None, f"{what} {name} does not exist", remedy
        if not os.access(path, os.X_OK):
            return None, f"{what} {name} is not executable by this user", f"chmod +x it, or {remedy}"
        return str(path.resolve()), "", ""
    found = shutil.which(name)
    if found is None:
        return None, f"{what} '{name}' was not found on PATH", remedy
    return found, "", ""


def _version(text: str) -> tuple[int, ...] | None:
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in found.groups() if part is not None) if found else None


def _dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"


def _probe_failure(result: children.ProbeResult) -> str:
    if result.status is None:
        return result.error or "it could not be run"
    said = " | ".join(line for line in result.output.strip().splitlines()[-3:] if line.strip())
    return f"it exited with status {result.status}" + (f" saying: {said}" if said else "")


# ---- virtiofsd -------------------------------------------------------------------------------

VIRTIOFSD_REMEDY = (
    "install virtiofsd >= 1.10 (the Rust one) or set virtiofsd.binary / --virtiofsd; without either, "
    "the built-in guest brings Debian 13's virtiofsd"
)


def virtiofsd_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))


def check_virtiofsd(name: str, needed: Iterable[tuple[str, str]], *, known: Facts | None = None) -> Check:
    """`needed`: (flag, who needs it) pairs, taken from the command lines this plan will run."""
    path, problem, remedy = resolve_binary(name, "the virtiofsd binary", VIRTIOFSD_REMEDY)
    if path is None:
        return fail("virtiofsd", problem, remedy)
    version_probe, help_probe = (known or Facts(None, store=False)).probe(path, [["--version"], ["--help"]])
    if version_probe.status != 0:
        return fail(
            "virtiofsd",
            f"{path} --version failed: {_probe_failure(version_probe)}",
            f"check that {path} is virtiofsd and runs on this system, or {VIRTIOFSD_REMEDY}",
            {"path": path},
        )
    version = _version(version_probe.output)
    supported = virtiofsd_flags(help_probe.output) if help_probe.status == 0 else set()
    users: dict[str, list[str]] = {}
    for flag, user in needed:
        if flag not in supported:
            users.setdefault(flag, [])
            if user not in users[flag]:
                users[flag].append(user)
    facts: dict[str, Fact] = {"path": path, "version": _dotted(version), "flags": sorted(supported)}
    if users:
        missing = ", ".join(f"{flag} (for {', '.join(who)})" for flag, who in sorted(users.items()))
        return fail(
            "virtiofsd",
            f"virtiofsd {_dotted(version)} at {path} lacks flags this configuration uses: {missing}",
            VIRTIOFSD_REMEDY,
            facts,
        )
    summary = f"virtiofsd {_dotted(version)} at {path}, with every flag this configuration uses"
    if version is None or version < MIN_VIRTIOFSD:
        return warn(
            "virtiofsd",
            f"{summary}, but its version ({_dotted(version)}) is older than "
            f"{_dotted(MIN_VIRTIOFSD)}, the oldest tested",
            VIRTIOFSD_REMEDY,
            facts,
        )
    return ok("virtiofsd", summary, facts)


# ---- QEMU ------------------------------------------------------------------------------------

QEMU_REMEDY = "install QEMU (apt-get install qemu-system-x86) or set qemu.binary / --qemu"


QEMU_LISTS = ("-machine", "-device", "-object", "-accel")


def check_qemu(name: str, machine: Machine, accel: Accel | None, *, known: Facts | None = None) -> Check:
    path, problem, remedy = resolve_binary(name, "the QEMU binary", QEMU_REMEDY)
    if path is None:
        return fail("qemu", problem, remedy)
    queries = [["-version"], *([what, "help"] for what in QEMU_LISTS)]
    version_probe, *lists = (known or Facts(None, store=False)).probe(path, queries)
    if version_probe.status != 0:
        return fail(
            "qemu", f"{path} -version failed: {_probe_failure(version_probe)}", QEMU_REMEDY, {"path": path}
        )
    version = _dotted(_version(version_probe.output))
    answers = {what: result.output for what, result in zip(QEMU_LISTS, lists, strict=True)}
    machines = set(re.findall(r"^(\S+)\s", answers["-machine"], re.MULTILINE))
    devices = set(re.findall(r'^name "([^"]+)"', answers["-device"], re.MULTILINE))
    objects = set(answers["-object"].split())
    accels = set(answers["-accel"].split())
    fs_device = "vhost-user-fs-pci" if machine is Machine.Q35 else "vhost-user-fs-device"
    facts: dict[str, Fact] = {"path": path, "version": version}
    lacking = []
    if machine.value not in machines:
        lacking.append(f"the machine type {machine.value}")
    for device in (fs_device, "virtconsole", "virtserialport"):
        if device not in devices:
            lacking.append(f"the device {device}")
    if "memory-backend-memfd" not in objects:
        lacking.append("the memory-backend-memfd object (vhost-user needs shared guest memory)")
    if accel is not None and accel.value not in accels:
        lacking.append(f"the {accel.value} accelerator")
    if lacking:
        return fail(
            "qemu",
            f"QEMU {version} at {path} lacks {', '.join(lacking)}",
            "use a QEMU built with vhost-user and virtio support (Debian's qemu-system-x86 >= 5.0), "
            "or set qemu.binary / --qemu; or choose another machine type (qemu.machine / --machine)",
            facts,
        )
    if machine is Machine.MICROVM and not QBOOT_ROM.is_file():
        return fail(
            "qemu",
            f"the microvm machine boots with qboot, but {QBOOT_ROM} is missing",
            'apt-get install qemu-system-data, or use machine = "q35"',
            facts,
        )
    return ok("qemu", f"QEMU {version} at {path}: machine {machine.value}, {fs_device}", facts)


def check_qemu_sandbox(path: str, *, enabled: bool, qemu_ok: Check, known: Facts | None = None) -> Check:
    """QEMU takes -sandbox SANDBOX: built with seccomp, and the kernel installs the filter.

    `-device help` is answered after QEMU's early options, which install the filter, so the probe
    fails as the VM would. It runs no machine.
    """
    if not enabled:
        return skip("qemu-sandbox", "QEMU's seccomp sandbox is off ([qemu] sandbox = false)")
    if qemu_ok.status is not Status.OK:
        return skip("qemu-sandbox", "no usable QEMU to ask")
    # A fact of this binary (built with seccomp or not), cached as the other QEMU probes are.
    query = ["-sandbox", SANDBOX, "-machine", "none", "-device", "help"]
    [result] = (known or Facts(None, store=False)).probe(path, [query])
    if result.status != 0:
        return fail(
            "qemu-sandbox",
            f"{path} cannot run under its seccomp sandbox (-sandbox {SANDBOX}): {_probe_failure(result)}",
            "use a QEMU built with seccomp (Debian's qemu-system-x86 is), on a kernel with "
            "CONFIG_SECCOMP_FILTER; or, knowing that a guest that takes over QEMU then runs "
            "unconfined, set sandbox = false in [qemu]",
        )
    return ok("qemu-sandbox", f"QEMU runs under its seccomp sandbox (-sandbox {SANDBOX})")


# ---- KVM and the accelerator -----------------------------------------------------------------

_STAGES = ("kvm-device", "kvm-access", "kvm-usable")


def _kvm_problem(name: str, requested: Accel, assessment: kvm.KvmAssessment, facts: dict[str, Fact]) -> Check:
    """The row of the first KVM stage that failed: how bad depends on what was asked for."""
    if requested is Accel.KVM:
        return fail(
            name,
            f'accel = "kvm" was requested but {assessment.reason}',
            f"{assessment.remedy}; or use --accel tcg (software emulation, slower) or --accel auto",
            facts,
        )
    if requested is Accel.AUTO:
        return warn(name, f"{assessment.reason}; the VM uses TCG instead", assessment.remedy, facts)
    return skip(name, f'not needed (accel = "tcg"): {assessment.reason}', facts)


def kvm_checks(
    device: Path, requested: Accel, assessment: kvm.KvmAssessment | None = None
) -> tuple[list[Check], Accel | None, str]:
    """The KVM rows, then the accelerator row; returns them with the accelerator (None: no start).

    `assessment` replaces looking at the host (tests of plans for hosts other than this one)."""
    assessment = assessment if assessment is not None else kvm.assess_kvm(device)
    failed = len(_STAGES) if assessment.usable else _STAGES.index(f"kvm-{assessment.stage}")
    state = assessment.node
    facts: dict[str, Fact] = {"device": str(device)}
    passed = {
        "kvm-device": f"{device} is the KVM device (char {state.major}:{state.minor})",
        "kvm-access": f"{device} is read-write for this user ({state.describe(access=False)})",
        "kvm-usable": assessment.reason,
    }
    rows: list[Check] = []
    for index, name in enumerate(_STAGES):
        if index < failed:
            rows.append(ok(name, passed[name], facts))
        elif index == failed:
            rows.append(_kvm_problem(name, requested, assessment, facts))
        else:
            rows.append(skip(name, f"not checked: {_STAGES[failed]} did not pass", facts))
    accel, reason = kvm.choose_accel(requested, assessment)
    if accel is None:
        rows.append(skip("accelerator", f'none: accel = "kvm" cannot be honoured ({_STAGES[failed]})'))
    else:
        summary = f"{accel.value}: {reason}"
        rows.append(ok("accelerator", summary, {"accel": accel.value, "requested": requested.value}))
    return rows, accel, reason


# ---- namespaces, pidfd, memfd, id maps ---------------------------------------------------------


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def namespace_flags(euid: int) -> int:
    """What virtiofsd's namespace sandbox unshares, in one call: a user namespace too when unprivileged."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET
    return flags if euid == 0 else flags | CLONE_NEWUSER


def check_namespaces(
    *, needed: bool, euid: int, allow_fallback: bool, fallback_sandbox: str, known: Facts | None = None
) -> Check:
    """Can virtiofsd's namespace sandbox be set up? Probed for real, as virtiofsd does it, in a child."""
    kind = "mount, pid and net namespaces" if euid == 0 else "user, mount, pid and net namespaces"
    if not needed:
        return skip("namespaces", "not needed: virtiofsd runs without its namespace sandbox")
    facts: dict[str, Fact] = {
        "unprivileged_userns_clone": _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone"),
        "max_user_namespaces": _read_sysctl("/proc/sys/user/max_user_namespaces"),
        "apparmor_restrict_unprivileged_userns": _read_sysctl(
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"
        ),
    }
    known = known or Facts(None, store=False)
    worked, key = known.namespaces_known_to_work(namespace_flags(euid))
    step, err = (-1, 0) if worked else children.probe_unshare([namespace_flags(euid)])
    if step < 0:
        known.remember(None if worked else key)
        return ok("namespaces", f"virtiofsd's sandbox can create {kind} here (probed with unshare)", facts)
    why = f"{errno.errorcode.get(err, str(err))}: {os.strerror(err)}" if err else "the probe died"
    remedies = []
    if euid != 0 and facts["unprivileged_userns_clone"] == "0":
        remedies.append("as root: sysctl -w kernel.unprivileged_userns_clone=1")
    if euid != 0 and facts["max_user_namespaces"] == "0":
        remedies.append("as root: sysctl -w user.max_user_namespaces=15000")
    if euid != 0 and facts["apparmor_restrict_unprivileged_userns"] == "1":
        remedies.append("as root: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu)")
    if err in (errno.EPERM, errno.ENOSYS) and not remedies:
        remedies.append(
            "inside a container, allow unshare in its seccomp profile (docker: --security-opt "
            "seccomp=PROFILE with unshare allowed, or seccomp=unconfined)"
        )
    summary = f"virtiofsd's sandbox cannot create {kind} here: unshare fails ({why})"
    if allow_fallback:
        return warn(
            "namespaces",
            f"{summary}. FALLING BACK, as virtiofsd.sandbox-fallback allows: virtiofsd runs with "
            f"--sandbox={fallback_sandbox} and --translate-uid/gid, without namespace isolation",
            "to get the isolation back: " + "; or ".join(remedies or ["allow unshare for this user"]),
            {**facts, "fallback": True},
        )
    remedies.append(
        "or let virtiofsd run without namespaces: virtiofsd.sandbox-fallback = true (--sandbox-fallback)"
    )
    return fail("namespaces", summary, "; ".join(remedies), facts)


def check_pidfd() -> Check:
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        return fail(
            "pidfd",
            f"pidfd_open failed ({exc.strerror}); the supervisor watches its children through pidfds",
            "use Linux >= 5.3, or allow pidfd_open in the container's seccomp profile",
        )
    os.close(fd)
    return ok("pidfd", "pidfd_open works")


def check_memfd() -> Check:
    try:
        fd = os.memfd_create("agentvm-doctor", os.MFD_CLOEXEC)
    except OSError as exc:
        return fail(
            "memfd",
            f"memfd_create failed ({exc.strerror}); QEMU's shared guest memory for virtio-fs needs it",
            "use Linux >= 3.17, or allow memfd_create in the container's seccomp profile",
        )
    os.close(fd)
    return ok("memfd", "memfd_create works (shared guest memory for vhost-user)")


def wide_maps(extra_args: Sequence[str]) -> list[tuple[str, int, int]]:
    """(flag, host base, count) of every --uid-map/--gid-map in `extra_args` that maps more than one id."""
    found = []
    for index, arg in enumerate(extra_args):
        flag, _, value = arg.partition("=")
        if flag not in ("--uid-map", "--gid-map"):
            continue
        if not value and index + 1 < len(extra_args):
            value = extra_args[index + 1]
        parts = value.strip(":").split(":")
        if len(parts) == 3 and all(part.isdigit() for part in parts) and int(parts[2]) > 1:
            found.append((flag, int(parts[1]), int(parts[2])))
    return found


def _subid_ranges(path: Path, user: str, uid: int) -> list[tuple[int, int]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[1].isdigit() and parts[2].isdigit():
            ranges.append((int(parts[1]), int(parts[2])))
    return ranges


def check_id_maps(extra_args: Sequence[str], euid: int) -> Check:
    """newuidmap/newgidmap and /etc/subuid|subgid, needed when virtiofsd is given a wider id map."""
    maps = wide_maps(extra_args)
    try:
        user = pwd.getpwuid(euid).pw_name
    except KeyError:
        user = str(euid)
    if euid == 0:
        return skip("id-maps", "not needed as root")
    if not maps:
        return skip("id-maps", "not needed: only this user's own id is mapped (no newuidmap, no /etc/subuid)")
    problems = []
    for flag, base, count in maps:
        tool = "newuidmap" if flag == "--uid-map" else "newgidmap"
        table = Path("/etc/subuid" if flag == "--uid-map" else "/etc/subgid")
        if shutil.which(tool) is None:
            problems.append(f"{tool} is not installed (apt-get install uidmap)")
        ranges = _subid_ranges(table, user, euid)
        if not any(start <= base and base + count <= start + length for start, length in ranges):
            problems.append(f"{table} gives {user} no range covering {base}..{base + count - 1} ({flag})")
    if problems:
        return fail(
            "id-maps",
            "virtiofsd.extra-args map more than one id, but " + "; ".join(problems),
            f"install uidmap and add '{user}:{maps[0][1]}:{maps[0][2]}' to /etc/subuid and /etc/subgid "
            "(usermod --add-subuids/--add-subgids), or map only your own id",
        )
    return ok("id-maps", "newuidmap/newgidmap and /etc/subuid|subgid cover the configured id maps")


# ---- runtime dir and sockets -----------------------------------------------------------------


def check_runtime_dir(base: Path) -> Check:
    facts: dict[str, Fact] = {"path": str(base)}
    if not base.exists() and not base.is_symlink():
        ancestor = base.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not os.access(ancestor, os.W_OK | os.X_OK):
            return fail(
                "runtime-dir",
                f"the runtime dir {base} does not exist and cannot be created: {ancestor} is not "
                "writable for this user",
                "make it writable, or choose another with --runtime-dir (runtime-dir in the config)",
                facts,
                exit_code=ExitCode.CANT_CREATE,
            )
        return ok("runtime-dir", f"{base} will be created (mode 0700)", facts)
    problem = runtime.base_problem(base)
    if problem is not None:
        return fail("runtime-dir", problem[0], problem[1], facts, exit_code=ExitCode.CANT_CREATE)
    if not os.access(base, os.W_OK | os.X_OK):
        return fail(
            "runtime-dir",
            f"the runtime dir {base} is not writable for this user, so no instance dir can be made in it",
            f"run 'chmod 700 {base}', or choose another with --runtime-dir",
            facts,
            exit_code=ExitCode.CANT_CREATE,
        )
    mode = base.stat().st_mode & 0o777
    if mode != 0o700:
        return warn(
            "runtime-dir",
            f"{base} is yours but mode {mode:04o}: other users can list the instances in it",
            f"chmod 700 {base}",
            facts,
        )
    return ok("runtime-dir", f"{base} is yours and mode 0700", facts)


def check_socket_paths(sockets: Sequence[tuple[Path, str]]) -> Check:
    # Longest first: the one to shorten the runtime dir for.
    by_length = sorted(sockets, key=lambda item: len(os.fsencode(item[0])), reverse=True)
    problems = [found for path, what in by_length if (found := runtime.socket_path_problem(path, what))]
    longest = max(sockets, key=lambda item: len(os.fsencode(item[0])))[0]
    facts: dict[str, Fact] = {"longest": str(longest), "bytes": len(os.fsencode(longest))}
    if problems:
        more = f" ({len(problems) - 1} more socket paths are too long too)" if len(problems) > 1 else ""
        return fail("socket-paths", problems[0][0] + more, problems[0][1], facts, exit_code=ExitCode.USAGE)
    return ok(
        "socket-paths",
        f"every socket path fits sun_path (longest: {facts['bytes']} of {runtime.SUN_PATH_MAX} bytes)",
        facts,
    )


# ---- the built-in guest ----------------------------------------------------------------------


def check_guest(env: Mapping[str, str], *, build: bool) -> tuple[Check, guest.GuestAssets | None]:
    """The built-in guest's assets; `build` (run) builds them when missing, else (doctor) never."""
    assets = guest.cached_assets(env)
    if assets is None and build:
        assets = guest.ensure_assets(env)
    if assets is None:
        where = guest.cache_root(env)
        return (
            warn(
                "guest",
                f"the built-in guest is not built yet; the first run builds it in {where} (~10 s, "
                "Debian packages downloaded and unpacked)",
                "nothing, or run 'agentvm-supervise run -- true' once to build it now",
                {"cache": str(where)},
            ),
            None,
        )
    versions = guest.asset_versions(assets)
    return (
        ok(
            "guest",
            f"built-in guest in {assets.directory}: kernel {versions.get('kernel', '?')}, "
            f"virtiofsd {versions.get('virtiofsd', '?')}",
            {
                "path": str(assets.directory),
                "kernel": versions.get("kernel"),
                "virtiofsd": versions.get("virtiofsd"),
            },
        ),
        assets,
    )
