"""Runner packages in the shape microvm.nix builds them (lib/runner.nix, lib/runners/*.nix).

A runner is a directory with bin/microvm-run (a bash script ending in one `exec` line whose words
are quoted as nixpkgs' escapeShellArgs quotes them), share/microvm/hypervisor, and for each virtiofs
share share/microvm/virtiofs/TAG/{socket,source}. These fixtures use the host's QEMU and the
built-in guest's kernel and initrd, so the QEMU ones boot for real; the cloud-hypervisor ones run a
stand-in program (cloud-hypervisor is not installed on the test machines).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import guest

HOST = "claude-vm"
# claude-microvm's layout: placeholder sources that never reach the hypervisor's command line
SHARES = (
    ("work", f"/tmp/{HOST}-work"),
    ("agent-home", f"/tmp/{HOST}-home"),
    ("cri-storage", f"/tmp/{HOST}-cri"),
)


def escape_shell_arg(arg: str) -> str:
    """nixpkgs' lib.escapeShellArg: bare when only [[:alnum:],._+:@%/-], else single-quoted."""
    if re.fullmatch(r"[A-Za-z0-9,._+:@%/-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\\''") + "'"


@dataclass
class RunnerFixture:
    directory: Path
    shares: Sequence[tuple[str, str]] = SHARES
    hypervisor: str = "qemu"
    pre_start: list[str] = field(default_factory=list)

    @property
    def script(self) -> Path:
        return self.directory / "bin" / "microvm-run"

    def write(self, command: Sequence[str]) -> Path:
        """Write the package; `command` is the hypervisor's argv (escapeShellArgs'd here)."""
        (self.directory / "bin").mkdir(parents=True, exist_ok=True)
        share = self.directory / "share" / "microvm"
        share.mkdir(parents=True, exist_ok=True)
        (share / "hypervisor").write_text(self.hypervisor + "\n")
        for tag, source in self.shares:
            (share / "virtiofs" / tag).mkdir(parents=True, exist_ok=True)
            (share / "virtiofs" / tag / "socket").write_text(f"{HOST}-virtiofs-{tag}.sock\n")
            (share / "virtiofs" / tag / "source").write_text(source + "\n")
        body = [
            "#!/bin/bash",
            "set -eou pipefail",
            *self.pre_start,
            "",
            "runtime_args=",
            "",
            f'exec -a "microvm@{HOST}" '
            + " ".join(escape_shell_arg(a) for a in command)
            + " ${runtime_args:-}",
            "",
        ]
        self.script.write_text("\n".join(body))
        self.script.chmod(0o755)
        return self.script


def qemu_command(
    assets: guest.GuestAssets,
    *,
    guest_command: Sequence[str] | None,
    shares: Sequence[tuple[str, str]] = SHARES,
    mem: int = 512,
    vcpus: int = 1,
    qmp: bool = True,
    user_net: bool = True,
) -> list[str]:
    """What lib/runners/qemu.nix makes of claude-microvm's base module (microvm machine, shares,
    serialConsole = false, virtconsole and a user netdev in qemu.extraArgs), on x86_64-linux."""
    params = guest.guest_cmdline(
        mounts=[(tag, path) for tag, path in zip((t for t, _ in shares), _guest_paths(shares), strict=True)],
        command=guest_command,
        guest_uid=1000,
        guest_gid=1000,
        term=None,
    )
    argv = [
        "/usr/bin/qemu-system-x86_64",
        "-name", HOST,
        "-M", "microvm,accel=kvm:tcg,acpi=on,mem-merge=on,pcie=on,pic=off,pit=off,rtc=on,usb=off",
        "-m", f"{mem}M",
        "-smp", str(vcpus),
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-kernel", str(assets.kernel),
        "-initrd", str(assets.initrd),
        "-chardev", "stdio,id=stdio,signal=off",
        "-device", "virtio-rng-pci",
        "-enable-kvm",
        "-cpu", "host,+x2apic,-sgx",
        "-device", "i8042",
        "-append", f" reboot=t panic=-1 {params}",
        "-nographic",
    ]  # fmt: skip
    if qmp:
        argv += ["-qmp", f"unix:{HOST}.sock,server,nowait"]
    argv += ["-numa", "node,memdev=mem", "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on"]
    for index, (tag, _) in enumerate(shares):
        argv += [
            "-chardev", f"socket,id=fs{index},path={HOST}-virtiofs-{tag}.sock",
            "-device", f"vhost-user-fs-pci,chardev=fs{index},tag={tag}",
        ]  # fmt: skip
    argv += ["-device", "virtio-serial-pci", "-device", "virtconsole,chardev=stdio"]
    if user_net:
        argv += ["-netdev", "user,id=usernet", "-device", "virtio-net-device,netdev=usernet"]
    return argv


def _guest_paths(shares: Sequence[tuple[str, str]]) -> list[str]:
    known = {"work": "/work", "agent-home": "/home/agent", "cri-storage": "/var/lib/containers"}
    return [known.get(tag, f"/mnt/{tag}") for tag, _ in shares]


def cloud_hypervisor_command(program: Path, *, shares: Sequence[tuple[str, str]] = SHARES) -> list[str]:
    """What lib/runners/cloud-hypervisor.nix writes (x86_64-linux, virtiofs shares, api socket)."""
    argv = [
        str(program),
        "--cpus", "boot=4",
        "--watchdog",
        "--kernel", "/nix/store/00000000000000000000000000000000-linux-6.12-dev/vmlinux",
        "--initramfs", "/nix/store/00000000000000000000000000000000-initrd-linux-6.12/initrd",
        "--cmdline", "earlyprintk=ttyS0 console=ttyS0 reboot=t panic=-1 init=/init",
        "--seccomp", "true",
        "--memory", "mergeable=on,shared=on,size=4096M",
        "--platform", "",
        "--console", "null",
        "--serial", "tty",
    ]  # fmt: skip
    if shares:
        argv += ["--fs", *(f"socket={HOST}-virtiofs-{tag}.sock,tag={tag}" for tag, _ in shares)]
    argv += ["--api-socket", f"{HOST}.sock"]
    return argv


# A stand-in for cloud-hypervisor: serves its HTTP API on --api-socket, writes its argv and every
# request to ARGV_FILE/REQUESTS_FILE next to itself; on vm.power-button it exits 0 unless the file
# IGNORE_POWER_BUTTON exists next to it; on vmm.shutdown it exits 0.
FAKE_CLOUD_HYPERVISOR = f"""#!{sys.executable}
import json, os, socket, sys
here = os.path.dirname(os.path.abspath(__file__))
argv = sys.argv[1:]
with open(os.path.join(here, "argv.json"), "w") as f:
    json.dump({{"argv0": sys.argv[0], "argv": argv, "cwd": os.getcwd()}}, f)
path = argv[argv.index("--api-socket") + 1]
path = path[len("path="):] if path.startswith("path=") else path
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen(4)
print("fake cloud-hypervisor: API server on", path, flush=True)
while True:
    conn, _ = server.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    line = data.split(b"\\r\\n", 1)[0].decode()
    with open(os.path.join(here, "requests.log"), "a") as f:
        f.write(line + "\\n")
    conn.sendall(b"HTTP/1.1 204 No Content\\r\\nContent-Length: 0\\r\\n\\r\\n")
    conn.close()
    if line.startswith("PUT /api/v1/vmm.shutdown"):
        sys.exit(0)
    if line.startswith("PUT /api/v1/vm.power-button"):
        if not os.path.exists(os.path.join(here, "IGNORE_POWER_BUTTON")):
            sys.exit(0)
"""
