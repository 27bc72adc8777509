"""A VM's SSH identity: its ed25519 host key, made once on the host, and the keys that may log in.

As seed 003 does it: the host key lives in the VM's state dir on the host, not in the guest, so it
survives every rebuild and restart of a throw-away guest and the client's known_hosts stays valid.
The directory is shared read-only into the guest at /etc/ssh/host-keys (its own virtiofs share),
with the `authorized_keys` of the config beside the key; the built-in guest's /init starts dropbear
with that key and copies authorized_keys to agent's ~/.ssh (guest/init.sh, `ssh_up`).

The files are written through the directory's O_NOFOLLOW fd that sharedirs opened for the share
(see there: a link in a path the guest can write to is never followed), each to a temp name and
renamed into place, so a crash never leaves half a key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor import xdg
from supervisor.config import Share, Ssh
from supervisor.errors import SupervisorError

SHARE_TAG = "ssh-host-keys"
GUEST_DIR = "/etc/ssh/host-keys"
HOST_KEY = "ssh_host_ed25519_key"
AUTHORIZED_KEYS = "authorized_keys"
KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


@dataclass(frozen=True)
class SshPlan:
    directory: Path  # the VM's key dir on the host
    authorized_keys: tuple[str, ...]

    def share(self) -> Share:
        return Share(
            tag=SHARE_TAG, source=str(self.directory), guest_path=GUEST_DIR, read_only=True, create=True
        )

    def kernel_args(self) -> list[str]:
        return [f"agentvm.ssh={GUEST_DIR}"]


def default_dir(env: Mapping[str, str], vm_name: str) -> Path:
    """$XDG_STATE_HOME/agentvm-supervise/vms/NAME/ssh-host-keys: per VM name, kept across starts."""
    return xdg.base("XDG_STATE_HOME", env) / xdg.APP / "vms" / vm_name / "ssh-host-keys"


def _check_key(line: str, index: int) -> str:
    fields = line.split()
    problem = None
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        problem = f"does not start with a key type ({', '.join(KEY_TYPES[:3])}, ...) and the key"
    else:
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except binascii.Error:
            blob = b""
        if not blob.startswith(len(fields[0]).to_bytes(4, "big") + fields[0].encode()):
            problem = f"has a {fields[0]} key that is not valid base64 of such a key"
    if problem is not None or "\n" in line:
        raise SupervisorError(
            f"ssh.authorized-keys[{index}] {problem or 'spans lines'}: give one public key per entry, "
            'as a .pub file holds it ("ssh-ed25519 AAAA... you@host")',
        )
    return line.strip()


def plan_ssh(
    config: Ssh, env: Mapping[str, str], vm_name: str, *, tap_network: bool, builtin: bool
) -> SshPlan | None:
    """On by default for the built-in guest on a tap network (the host reaches it at its address)."""
    enabled = config.enable if config.enable is not None else tap_network and builtin
    if not enabled:
        return None
    if not builtin:
        raise SupervisorError(
            "ssh.enable = true needs the built-in guest, which runs the SSH server itself; another guest "
            "runs its own (share a host key dir into it with a read-only [[shares]] entry)",
        )
    if not tap_network:
        raise SupervisorError(
            'ssh.enable = true needs network mode "tap": with the user-mode network the host cannot '
            'reach the guest\'s port 22; set [network] mode = "tap" (with bridge and address)',
        )
    keys = tuple(_check_key(line, index) for index, line in enumerate(config.authorized_keys))
    directory = Path(config.host_keys).expanduser() if config.host_keys else default_dir(env, vm_name)
    if not directory.is_absolute():
        raise SupervisorError(f"ssh.host-keys '{config.host_keys}' is relative: give an absolute path")
    return SshPlan(directory, keys)


def _write(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    temp = f".{name}.{secrets.token_hex(4)}"
    fd = os.open(
        temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd
    )
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def ensure_keys(plan: SshPlan, dir_fd: int) -> str:
    """Make the host key if the VM has none yet; write authorized_keys. Returns the public key."""
    # imported here: about 70 ms that only VMs with SSH should pay
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        if not _exists(dir_fd, HOST_KEY):
            key = ed25519.Ed25519PrivateKey.generate()
            private = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
            _write(dir_fd, HOST_KEY, private, 0o600)
        fd = os.open(HOST_KEY, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as source:
            loaded = serialization.load_ssh_private_key(source.read(), password=None)
        public = loaded.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(dir_fd, f"{HOST_KEY}.pub", public + b"\n", 0o644)
        _write(dir_fd, AUTHORIZED_KEYS, "".join(f"{k}\n" for k in plan.authorized_keys).encode(), 0o644)
    except (OSError, ValueError) as exc:
        raise SupervisorError(
            f"the SSH host key in {plan.directory} cannot be made or read ({exc}): check that directory "
            f"(its {HOST_KEY} must be an unencrypted OpenSSH ed25519 key), or remove {HOST_KEY} to get a "
            "new one (clients will then warn once about the changed host key)",
        ) from None
    return public.decode()


def public_key_of(plan: SshPlan | None, share_dirs: Mapping[str, int]) -> str | None:
    """For the instance's start: the host key, made when missing (None: no SSH for this VM)."""
    if plan is None:
        return None
    return ensure_keys(plan, share_dirs[SHARE_TAG])
