"""Run a command the way a container's default seccomp profile would: unshare(2) fails with EPERM.

    python -m tests.deny_unshare CMD ARGS...

Installs a classic-BPF seccomp filter (no libseccomp needed) under no_new_privs, then execs CMD;
the filter is inherited by everything CMD starts (virtiofsd included).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
AUDIT_ARCH_X86_64 = 0xC000003E
NR_UNSHARE_X86_64 = 272
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06


class _Fprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def install() -> None:
    if platform.machine() != "x86_64":
        raise SystemExit("deny_unshare: x86_64 only")
    program = b"".join(
        [
            _insn(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            _insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # another ABI: leave it alone
            _insn(BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
            _insn(BPF_JEQ_K, 0, 1, NR_UNSHARE_X86_64),
            _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
            _insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
        ]
    )
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _Fprog(len(program) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])  # noqa: S606 - exec is the point: no shell in between
