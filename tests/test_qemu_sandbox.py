"""QEMU under its seccomp sandbox (issue 11: the built-in guest's QEMU ran unconfined)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from supervisor import config, guest
from supervisor.qemu import SANDBOX, QemuSpec, qemu_argv, sandbox_options
from tests.support import instance_processes, leftovers, start_supervisor, wait_until_gone


def _spec(tmp_path: Path, *, sandbox: str | None) -> QemuSpec:
    return QemuSpec(
        binary="qemu", instance="i", machine=config.Machine.Q35, accel=config.Accel.TCG, cpu="max",
        kernel=tmp_path / "k", initrd=None, cmdline="", memory_mib=512, vcpus=1, shares=[],
        private_qmp_fd=3, public_qmp_fd=4, status_fd=5, extra_args=[], sandbox=sandbox,
    )  # fmt: skip


def test_the_sandbox_is_on_by_default_and_the_config_turns_it_off(tmp_path: Path) -> None:
    assert config.Qemu().sandbox is True
    argv = qemu_argv(_spec(tmp_path, sandbox=SANDBOX))
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert "spawn=deny" in SANDBOX and "elevateprivileges=deny" in SANDBOX
    assert sandbox_options(spawn=False) == SANDBOX
    assert "-sandbox" not in qemu_argv(_spec(tmp_path, sandbox=None))
    assert config.load(None, {"qemu": {"sandbox": False}}).qemu.sandbox is False


def _qmp(path: Path | socket.socket, *commands: dict[str, object]) -> list[bytes]:
    """Send commands on a QMP socket, each after the last one's reply (QEMU drops queued commands
    when the client hangs up); the replies, up to QEMU hanging up (killed, or `quit`)."""
    replies = []
    with contextlib.ExitStack() as stack:
        if isinstance(path, socket.socket):
            sock = stack.enter_context(path)
        else:
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.connect(str(path))
        sock.settimeout(30)
        reader = stack.enter_context(sock.makefile("rb"))
        assert b"QMP" in reader.readline()
        for command in commands:
            sock.sendall(json.dumps(command).encode() + b"\n")
            try:
                reply = reader.readline()
            except ConnectionResetError:
                reply = b""
            if not reply:
                break
            replies.append(reply)
    return replies


def _spawn_attempt(script: Path, marker: Path) -> dict[str, object]:
    """What a guest that took QEMU over could do: make QEMU start a program. A tap netdev's
    script= is forked and exec'd by QEMU (after it opened /dev/net/tun, hence root only)."""
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o755)
    name = f"agsbx{os.getpid() % 100000}"  # the tap goes away with QEMU
    return {
        "execute": "netdev_add",
        "arguments": {
            "type": "tap",
            "id": "probe",
            "ifname": name,
            "script": str(script),
            "downscript": "no",
        },
    }


needs_tun = pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/dev/net/tun").exists(), reason="a tap netdev needs root and /dev/net/tun"
)


@needs_tun
@pytest.mark.parametrize("sandbox", [False, True])
def test_a_spawn_attempt_is_refused_only_under_the_sandbox(tmp_path: Path, sandbox: bool) -> None:
    """A real QEMU (no machine) asked to start a program: it does without -sandbox, and is killed
    with SIGSYS before the program runs with it."""
    marker = tmp_path / "spawned"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
         *(["-sandbox", SANDBOX] if sandbox else []),
         "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    try:
        _qmp(
            ours,
            {"execute": "qmp_capabilities"},
            _spawn_attempt(tmp_path / "up.sh", marker),
            {"execute": "quit"},
        )
        assert proc.wait(timeout=30) == (-signal.SIGSYS if sandbox else 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert marker.exists() is not sandbox


@needs_tun
@pytest.mark.vm
def test_the_guests_qemu_runs_under_seccomp_and_cannot_start_programs(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    work, runtime, marker = tmp_path / "work", tmp_path / "rt", tmp_path / "spawned"
    work.mkdir()
    sup = start_supervisor(
        ["run", "--name", "seccomp", "--work-dir", str(work), "--agent-home", str(tmp_path / "home"),
         "--runtime-dir", str(runtime), "--", "sh", "-c", "echo GUEST-READY; sleep 600"]
    )  # fmt: skip
    try:
        sup.read_until(b"GUEST-READY")
        [qemu] = [pid for pid, cmdline in instance_processes("seccomp") if "qemu-system" in cmdline]
        status = Path(f"/proc/{qemu}/status").read_text()
        assert "\nSeccomp:\t2\n" in status  # a filter is installed (2 = SECCOMP_MODE_FILTER)
        [qmp] = runtime.glob("seccomp-*/qmp.sock")
        assert (
            len(_qmp(qmp, {"execute": "qmp_capabilities"}, _spawn_attempt(tmp_path / "up.sh", marker))) == 1
        )
        code, _, stderr = sup.finish()
        assert code == 128 + signal.SIGSYS, stderr
        assert "killed by SIGSYS" in stderr
        assert not marker.exists()
    finally:
        if sup.proc.poll() is None:
            sup.proc.kill()
            sup.proc.communicate()
    assert wait_until_gone("seccomp") == []
    assert leftovers(runtime, timeout=10) == []
