"""/dev/kvm: is it there, may we use it, and can a stock guest kernel run on it.

This module reports; `plan` decides. `accel = "auto"` must not trust the node alone: on hosts whose
KVM is PVM-based (a host kernel with CONFIG_KVM_PVM, /sys/module/kvm_pvm present, no vmx/svm CPU
flags) /dev/kvm opens and answers KVM_GET_API_VERSION, yet only PVM-built guest kernels boot: QEMU
aborts with `-cpu host` (MSR 0x10a) or a stock guest never finishes booting.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Accel
from supervisor.errors import ExitCode, SupervisorError


@dataclass(frozen=True)
class KvmAssessment:
    usable: bool
    reason: str  # why (not): one sentence, for logs and errors
    remedy: str = ""


def assess_kvm(
    device: Path = Path("/dev/kvm"),
    *,
    cpuinfo: Path = Path("/proc/cpuinfo"),
    sys_module: Path = Path("/sys/module"),
) -> KvmAssessment:
    if not device.exists():
        return KvmAssessment(
            False,
            f"{device} does not exist",
            "load the kvm module (modprobe kvm_intel or kvm_amd), enable virtualization in the "
            "firmware, or pass the device into the container (--device /dev/kvm)",
        )
    if not os.access(device, os.R_OK | os.W_OK):
        return KvmAssessment(
            False,
            f"{device} is not readable and writable by this user (uid {os.geteuid()})",
            f"add the user to the group owning {device} (usually 'kvm') and log in again",
        )
    if (sys_module / "kvm_pvm").exists():
        return KvmAssessment(
            False,
            "this host's KVM is PVM-based (kvm_pvm is loaded), which boots only PVM-built guest kernels",
            'use accel = "tcg", or a guest kernel built for PVM',
        )
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        flags = ""
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE):
        return KvmAssessment(
            False,
            "the CPU shows no hardware virtualization flag (vmx or svm) in /proc/cpuinfo",
            "enable VT-x/AMD-V (or nested virtualization) for this machine",
        )
    return KvmAssessment(True, f"{device} is usable and the CPU has hardware virtualization")


def choose_accel(requested: Accel, assessment: KvmAssessment) -> tuple[Accel, str]:
    """The accelerator to use and why, or a SupervisorError when "kvm" was demanded but can't be had."""
    if requested is Accel.TCG:
        return Accel.TCG, 'accel = "tcg" was requested'
    if requested is Accel.KVM:
        if not assessment.usable:
            raise SupervisorError(
                f'accel = "kvm" was requested but {assessment.reason}: {assessment.remedy}; or use '
                "--accel tcg (software emulation, slower) or --accel auto",
                exit_code=ExitCode.UNAVAILABLE,
            )
        return Accel.KVM, 'accel = "kvm" was requested'
    if assessment.usable:
        return Accel.KVM, assessment.reason
    return Accel.TCG, f"KVM is not usable: {assessment.reason}; falling back to TCG (software emulation)"
