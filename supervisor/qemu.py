"""The QEMU command line for a direct runner (`[qemu]` in the config, or the built-in guest)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Accel, Machine
from supervisor.network import GuestNetwork

QBOOT_ROM = "/usr/share/qemu/qboot.rom"
STATUS_PORT = "org.agentvm.status"
RESIZE_PORT = "org.agentvm.resize"  # "ROWS COLS" lines for the guest's console (console.py)
# QEMU's seccomp filter, as libvirt sets it: no obsolete syscalls, no setuid/capabilities, no
# fork/exec (a guest that takes over QEMU cannot start programs), no scheduler/affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def sandbox_options(*, spawn: bool) -> str:
    """SANDBOX, or with `spawn` what the egress allowlist's `guestfwd=...-cmd:` handoff needs:
    libslirp forks, calls setsid and execs the handoff for each guest connection (egress). The
    allow-list is no weaker for it: a QEMU taken over by the guest could connect() anywhere anyway."""
    if not spawn:
        return SANDBOX
    return "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny"


@dataclass(frozen=True, kw_only=True)
class QemuSpec:
    binary: str
    instance: str
    machine: Machine
    accel: Accel
    cpu: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    memory_mib: int
    vcpus: int
    shares: list[tuple[str, Path]]  # (tag, vhost-user socket)
    private_qmp_fd: int  # one end of a socketpair: the supervisor's own QMP connection
    public_qmp_fd: int  # a listening socket the supervisor bound at RUNTIME/qmp.sock
    status_fd: int  # one end of a socketpair: the guest's status port (statusport.py)
    extra_args: list[str]
    network: GuestNetwork | None = None  # None: no NIC
    resize_fd: int | None = None  # one end of a socketpair: the supervisor sends terminal sizes
    sandbox: str | None = SANDBOX  # -sandbox's options (sandbox_options); None: [qemu] sandbox = false


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC rate in kHz, when /proc/cpuinfo can tell it: with a constant TSC, "cpu MHz".

    Under TCG, QEMU's guest TSC is the host's. On the microvm machine a guest kernel has nothing to
    calibrate the TSC against (no PIT, no HPET, no ACPI PM timer it trusts) and most boots hang at
    "Marking TSC unstable"; tsc_early_khz= tells it the rate instead.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)
    if not flags or "constant_tsc" not in flags.group(1).split() or not mhz:
        return None
    khz = round(float(mhz.group(1)) * 1000)
    return khz if khz > 0 else None


def qemu_escape(value: str) -> str:
    """A value for a QEMU option list (`-chardev socket,path=VALUE`): ',' is written ',,'. Without it a
    path like /tmp/rt,logfile=/tmp/leak adds options of its own."""
    return value.replace(",", ",,")


def qemu_argv(spec: QemuSpec) -> list[str]:
    bus = "pci" if spec.machine is Machine.Q35 else "device"
    machine = spec.machine.value
    if spec.machine is Machine.MICROVM:
        machine += ",acpi=on,pit=off,pic=off,isa-serial=off,rtc=on"
    argv = [
        spec.binary,
        "-name", qemu_escape(spec.instance),
        "-machine", f"{machine},accel={spec.accel.value}",
        "-cpu", spec.cpu,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.vcpus),
        # vhost-user-fs needs guest RAM the back-end can map: a shared memfd.
        "-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on",
        "-numa", "node,memdev=mem",
        "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
        *(["-sandbox", spec.sandbox] if spec.sandbox else []),
        "-kernel", str(spec.kernel),
        "-append", spec.cmdline,
    ]  # fmt: skip
    if spec.machine is Machine.MICROVM:
        argv += ["-bios", QBOOT_ROM]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    # The console is virtconsole (hvc0) on QEMU's stdio, which is a PTY the supervisor owns;
    # signal=off so Ctrl-C reaches the guest instead of stopping QEMU.
    argv += [
        "-chardev", "stdio,id=console,signal=off",
        "-device", f"virtio-serial-{bus},id=vser0",
        "-device", "virtconsole,chardev=console,bus=vser0.0",
        "-chardev", f"socket,id=status,fd={spec.status_fd}",
        "-device", f"virtserialport,chardev=status,name={STATUS_PORT},bus=vser0.0",
        "-chardev", f"socket,id=qmp-supervisor,fd={spec.private_qmp_fd}",
        "-mon", "chardev=qmp-supervisor,mode=control",
        "-chardev", f"socket,id=qmp,fd={spec.public_qmp_fd},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip
    if spec.resize_fd is not None:
        argv += [
            "-chardev", f"socket,id=resize,fd={spec.resize_fd}",
            "-device", f"virtserialport,chardev=resize,name={RESIZE_PORT},bus=vser0.0",
        ]  # fmt: skip
    for index, (tag, socket_path) in enumerate(spec.shares):
        argv += [
            "-chardev", f"socket,id=fs{index},path={qemu_escape(str(socket_path))}",
            "-device", f"vhost-user-fs-{bus},chardev=fs{index},tag={tag}",
        ]  # fmt: skip
    if spec.network is not None:
        argv += spec.network.qemu_args(bus)
    argv += spec.extra_args
    return argv
