"""/dev/kvm: is it there, may we use it, and can a stock guest kernel run on it.

This module reports what it finds; `checks` turns the findings into doctor rows and `choose_accel`
turns them into the accelerator. `accel = "auto"` must not trust the node alone: on hosts whose KVM
is PVM-based (a host kernel with CONFIG_KVM_PVM, /sys/module/kvm_pvm present, no vmx/svm CPU flags)
/dev/kvm opens, answers KVM_GET_API_VERSION and even creates VMs, yet only PVM-built guest kernels
boot: QEMU aborts with `-cpu host` (MSR 0x10a) or a stock guest never finishes booting.

How `auto` decides, and why there is no probe boot: KVM is used when the node opens read-write,
answers KVM_GET_API_VERSION with 12, creates a VM (KVM_CREATE_VM, closed at once: microseconds),
kvm_pvm is not loaded and the CPU shows vmx or svm. Each known way a KVM fails to run a stock guest
shows up in one of these. A cached probe boot of the guest (keyed by kernel and QEMU versions) was
considered and left out: a PVM host's failure mode is a guest that never boots, so the probe would
cost its whole deadline (seconds) whenever the key changes; it would run a VM to decide how to run
a VM, with twice the failure modes; and it would not catch more than the checks above on the hosts
we know. Whoever knows better sets `accel = "kvm"` (or "tcg") and no guessing happens.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Accel

DEFAULT_DEVICE = Path("/dev/kvm")
KVM_MAJOR, KVM_MINOR = 10, 232  # the misc device the kvm module registers
KVM_API_VERSION = 12  # the only version there has ever been
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)
_ACL_XATTR = "system.posix_acl_access"


@dataclass(frozen=True)
class NodeState:
    """What the device node looks like right now; equal states mean nothing a user cares about changed."""

    exists: bool
    is_char: bool = False
    major: int = 0
    minor: int = 0
    mode: int = 0  # permission bits only
    uid: int = -1
    gid: int = -1
    acl: bytes | None = None  # the raw system.posix_acl_access xattr: changes with setfacl
    rw: bool = False  # readable and writable by this process (os.access honours ACLs)

    @property
    def is_kvm(self) -> bool:
        return self.is_char and (self.major, self.minor) == (KVM_MAJOR, KVM_MINOR)

    def describe(self, *, access: bool = True) -> str:
        if not self.exists:
            return "absent"
        kind = f"char {self.major}:{self.minor}" if self.is_char else "not a character device"
        group = group_name(self.gid) or f"gid {self.gid}"
        acl = ", with an ACL" if self.acl else ""
        text = f"{kind}, mode {self.mode:04o}, owner uid {self.uid}, group {group}{acl}"
        if access:
            text += ", read-write for this user" if self.rw else ", no read-write access for this user"
        return text


def node_state(device: Path) -> NodeState:
    try:
        info = device.stat()
    except OSError:
        return NodeState(exists=False)
    acl: bytes | None = None
    with contextlib.suppress(OSError):  # ENODATA: no ACL; EOPNOTSUPP: the fs has none
        acl = os.getxattr(device, _ACL_XATTR)
    return NodeState(
        exists=True,
        is_char=stat.S_ISCHR(info.st_mode),
        major=os.major(info.st_rdev),
        minor=os.minor(info.st_rdev),
        mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
        acl=acl,
        rw=os.access(device, os.R_OK | os.W_OK),
    )


def group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def access_remedy(device: Path, state: NodeState) -> str:
    """What to do about a node this user cannot open read-write, from who owns it."""
    name = group_name(state.gid)
    if name is None:
        # The node's group exists on the host but not here: typical of a container handed /dev/kvm.
        return (
            f"{device} belongs to gid {state.gid}, which has no name in this system's /etc/group: "
            f"the host's kvm group id differs from this container's. Start the container with "
            f"--group-add {state.gid} (docker/podman), or create a group with gid {state.gid} and add "
            "this user to it"
        )
    if (state.mode & 0o060) != 0o060 and not state.acl:
        return (
            f"{device} is not read-write for its group '{name}' (mode {state.mode:04o}): install the "
            "udev rule of your distribution's qemu/systemd package (it makes the node 0660 root:kvm), or "
            f"run 'chmod 0660 {device}; chgrp kvm {device}' as root"
        )
    if state.gid in os.getgroups() or state.gid == os.getegid():
        return (
            f"{device} is group '{name}' read-write, yet access is denied: check its ACL (getfacl {device})"
        )
    return (
        f"add this user to the group '{name}' that owns {device} (usermod -aG {name} "
        f"{_user_name()}) and log in again"
    )


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def pvm_loaded(sys_module: Path = Path("/sys/module")) -> bool:
    return (sys_module / "kvm_pvm").exists()


def cpu_virt_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    found: set[str] = set()
    for line in re.findall(r"^flags\s*:(.*)$", text, re.MULTILINE):
        found.update({"vmx", "svm"} & set(line.split()))
    return found


def probe_api(device: Path) -> tuple[int | None, str | None]:
    """(KVM_GET_API_VERSION, None) after a KVM_CREATE_VM that worked, or (version, why it failed)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        reason = "no kvm module behind it" if exc.errno in (errno.ENODEV, errno.ENXIO) else exc.strerror
        return None, f"opening {device} failed ({reason})"
    try:
        try:
            version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        except OSError as exc:
            return None, f"{device} does not answer KVM_GET_API_VERSION ({exc.strerror})"
        if version != KVM_API_VERSION:
            return version, f"{device} reports KVM API version {version}, not {KVM_API_VERSION}"
        try:
            os.close(fcntl.ioctl(fd, _KVM_CREATE_VM, 0))
        except OSError as exc:
            return version, f"{device} refuses to create a VM (KVM_CREATE_VM: {exc.strerror})"
        return version, None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class KvmAssessment:
    usable: bool
    reason: str  # why (not): one sentence, for logs and errors
    remedy: str = ""
    stage: str = "usable"  # the first stage that failed: "device", "access" or "usable"
    node: NodeState = NodeState(exists=False)
    api_version: int | None = None


def assess_kvm(
    device: Path = DEFAULT_DEVICE,
    *,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    sys_module: Path = Path("/sys/module"),
    qemu_device: Path = DEFAULT_DEVICE,
) -> KvmAssessment:
    """Walk the stages device -> access -> usable and stop at the first that fails.

    `device` is the node to look at (config `kvm-device`); `qemu_device` is the one QEMU opens, which
    is always /dev/kvm: when they differ, KVM is only usable if both are the same device.
    """
    node = node_state(device)
    problem = _node_problem(device, node)
    if problem is not None:
        return problem
    version, failure = probe_api(device)
    if failure is not None:
        return KvmAssessment(
            False,
            failure,
            "load the kvm module for this CPU (modprobe kvm_intel or kvm_amd) and check dmesg",
            node=node,
            api_version=version,
        )
    if pvm_loaded(sys_module):
        return KvmAssessment(
            False,
            f"this host's KVM is PVM-based ({device} answers API version {version}, but kvm_pvm is "
            "loaded), which boots only PVM-built guest kernels",
            'use accel = "tcg", or a guest kernel built for PVM',
            node=node,
            api_version=version,
        )
    if not cpu_virt_flags(cpuinfo):
        return KvmAssessment(
            False,
            "the CPU shows no hardware virtualization flag (vmx or svm) in /proc/cpuinfo",
            "enable VT-x/AMD-V (or nested virtualization) for this machine",
            node=node,
            api_version=version,
        )
    if device != qemu_device:
        qemu_node = node_state(qemu_device)
        if (qemu_node.major, qemu_node.minor, qemu_node.is_char) != (node.major, node.minor, True):
            return KvmAssessment(
                False,
                f"{device} is usable, but QEMU always opens {qemu_device}, which is {qemu_node.describe()}",
                f"make {qemu_device} the KVM device too (QEMU has no option for another path)",
                node=node,
                api_version=version,
            )
    return KvmAssessment(
        True,
        f"{device} is usable (API version {version}) and the CPU has hardware virtualization",
        node=node,
        api_version=version,
    )


def _node_problem(device: Path, node: NodeState) -> KvmAssessment | None:
    """The stages "device" (the node is KVM's) and "access" (this user may open it)."""
    if not node.exists:
        return KvmAssessment(
            False,
            f"{device} does not exist",
            "load the kvm module (modprobe kvm_intel or kvm_amd), enable virtualization in the "
            "firmware, or pass the device into the container (--device /dev/kvm); "
            "'run --wait-kvm' waits for it to appear",
            stage="device",
            node=node,
        )
    if not node.is_kvm:
        return KvmAssessment(
            False,
            f"{device} is not the KVM device ({node.describe()}; KVM is char {KVM_MAJOR}:{KVM_MINOR})",
            f"point kvm-device at the KVM node, or recreate it: mknod {device} c {KVM_MAJOR} {KVM_MINOR}",
            stage="device",
            node=node,
        )
    if not node.rw:
        return KvmAssessment(
            False,
            f"{device} is not readable and writable by this user (uid {os.geteuid()}): "
            f"{node.describe(access=False)}",
            access_remedy(device, node),
            stage="access",
            node=node,
        )
    return None


def choose_accel(requested: Accel, assessment: KvmAssessment) -> tuple[Accel | None, str]:
    """The accelerator to use and why; None when "kvm" was demanded but cannot be had."""
    if requested is Accel.TCG:
        return Accel.TCG, 'accel = "tcg" was requested'
    if requested is Accel.KVM:
        if not assessment.usable:
            return None, f'accel = "kvm" was requested but {assessment.reason}'
        return Accel.KVM, 'accel = "kvm" was requested'
    if assessment.usable:
        return Accel.KVM, assessment.reason
    return Accel.TCG, f"KVM is not usable: {assessment.reason}; falling back to TCG (software emulation)"
