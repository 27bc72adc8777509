"""`run --wait-kvm` with a real device node appearing (or not) at the configured kvm-device path, and
the KVM device being watched while a real VM runs."""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor import guest
from tests.support import (
    Supervisor,
    instance_processes,
    leftovers,
    run_supervisor,
    start_supervisor,
    user_ids,
    wait_until_gone,
)
from tests.test_kvm_watch import acl_granting, mknod


class Streams:
    """Both pipes of a background supervisor, read as they come (a full pipe would stall it)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.stdout = bytearray()
        self.stderr = bytearray()

    def wait_for(self, needle: str, *, timeout: float = 90.0) -> list[dict[str, object]]:
        """Read until a JSON log line contains `needle`; returns the events of such lines so far."""
        proc = self.sup.proc
        assert proc.stdout is not None and proc.stderr is not None
        fds = {proc.stdout.fileno(): self.stdout, proc.stderr.fileno(): self.stderr}
        deadline = time.monotonic() + timeout
        while needle.encode() not in self.stderr:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not fds:
                raise AssertionError(
                    f"{needle!r} not logged within {timeout} s; stderr: {bytes(self.stderr)!r}"
                )
            ready, _, _ = select.select(list(fds), [], [], remaining)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if chunk:
                    fds[fd] += chunk
                else:
                    del fds[fd]
        lines = bytes(self.stderr).decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{") and needle in line]

    def kill(self) -> None:
        if self.sup.proc.poll() is None:
            self.sup.proc.kill()
            self.sup.proc.communicate(timeout=60)

    def events(self) -> list[dict[str, object]]:
        lines = bytes(self.stderr).decode(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def finish(self, timeout: float = 90.0) -> tuple[int, str]:
        out, err = self.sup.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.sup.proc.returncode, bytes(self.stderr).decode(errors="replace")


@pytest.fixture
def background() -> Iterator[Callable[..., Streams]]:
    """Starts supervisors in the background; a failed assertion must not leave a VM behind, so
    any still running at the end get SIGKILL (their watchdog cleans up after them)."""
    started: list[Streams] = []

    def start(args: list[str], **kwargs: Any) -> Streams:
        streams = Streams(start_supervisor(args, **kwargs))
        started.append(streams)
        return streams

    yield start
    for streams in started:
        streams.kill()


def _args(base: Path, name: str, device: Path) -> list[str]:
    return [
        "run", "--name", name, "--work-dir", str(base / "work"), "--agent-home", str(base / "home"),
        "--runtime-dir", str(base / "rt"), "--kvm-device", str(device),
    ]  # fmt: skip


@pytest.mark.vm
def test_wait_kvm_starts_the_vm_when_the_node_appears(
    guest_assets: guest.GuestAssets, tmp_path: Path, background: Callable[..., Streams]
) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "dev").mkdir()
    device = tmp_path / "dev" / "kvm"
    sup = background([*_args(tmp_path, "wait-appears", device), "--wait-kvm=120", "-v", "--", "true"])
    sup.wait_for("waiting for the KVM device")
    assert instance_processes("wait-appears") == []  # nothing started while waiting
    mknod(device, 0o600)
    code, stderr = sup.finish()
    assert code == 0, stderr
    events = sup.events()
    ready = next(event for event in events if event["event"] == "the KVM device is ready")
    assert ready["device"] == str(device)
    started = next(event for event in events if event["event"] == "vm started")
    # The node that appeared is a real KVM of this PVM host: assessed, and auto chose TCG for it.
    assert started["accel"] == "tcg" and "kvm_pvm is loaded" in str(started["why"]), started
    assert str(device) in str(started["why"])
    assert wait_until_gone("wait-appears") == [] and leftovers(tmp_path / "rt") == []


@pytest.mark.vm
def test_wait_kvm_as_a_user_waits_for_access_not_just_the_node(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path, background: Callable[..., Streams]
) -> None:
    """As udev does it: the node appears 0600 root first, and only a moment later becomes usable."""
    uid, gid = user_ids(test_user)
    os.chown(shared_tmp, uid, gid)
    (shared_tmp / "work").mkdir()
    os.chown(shared_tmp / "work", uid, gid)
    (shared_tmp / "dev").mkdir()  # root's, like /dev
    device = shared_tmp / "dev" / "kvm"
    sup = background(
        [*_args(shared_tmp, "wait-access", device), "--wait-kvm=120", "-v", "--", "true"],
        user=test_user,
        cwd=shared_tmp,
    )
    sup.wait_for("waiting for the KVM device")
    mknod(device, 0o600)
    sup.wait_for('"appeared: char 10:232')
    assert not [event for event in sup.events() if event["event"] == "the KVM device is ready"]
    os.setxattr(device, "system.posix_acl_access", acl_granting(uid))  # setfacl -m u:USER:rw
    code, stderr = sup.finish()
    assert code == 0, stderr
    assert [event for event in sup.events() if event["event"] == "the KVM device is ready"]
    assert wait_until_gone("wait-access") == []


def test_wait_kvm_times_out_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "dev").mkdir()
    device = tmp_path / "dev" / "kvm"
    started = time.monotonic()
    result = run_supervisor([*_args(tmp_path, "wait-timeout", device), "--wait-kvm=1.5", "--", "true"])
    assert result.returncode == 69, result.stderr
    assert time.monotonic() - started >= 1.5
    final = result.stderr.strip().splitlines()[-1]
    assert final.startswith(f"agentvm-supervise: {device} did not appear within 1.5 s (--wait-kvm=1.5)")
    assert "modprobe kvm_intel" in final and "leave out --wait-kvm" in final
    assert instance_processes("wait-timeout") == []
    assert leftovers(tmp_path / "rt") == []


def test_wait_kvm_timeout_names_the_missing_permission(test_user: str, shared_tmp: Path) -> None:
    (shared_tmp / "dev").mkdir()
    device = shared_tmp / "dev" / "kvm"
    mknod(device, 0o600)
    result = run_supervisor(
        [*_args(shared_tmp, "wait-perm", device), "--wait-kvm=1", "--", "true"],
        user=test_user,
        cwd=shared_tmp,
    )
    assert result.returncode == 69, result.stderr
    final = result.stderr.strip().splitlines()[-1]
    assert "exists but was still not readable and writable by this user after 1 s" in final
    assert f"chmod 0660 {device}" in final


def test_wait_kvm_returns_at_once_when_the_node_is_usable_and_rejects_a_bad_timeout(tmp_path: Path) -> None:
    result = run_supervisor(["run", "--wait-kvm=soon", "--", "true"])
    assert result.returncode == 64
    assert "invalid --wait-kvm timeout 'soon'" in result.stderr
    # A usable node: no wait, straight on to the preflight (which stops at the missing work dir).
    (tmp_path / "dev").mkdir()
    mknod(tmp_path / "dev" / "kvm")
    result = run_supervisor(
        [*_args(tmp_path, "wait-none", tmp_path / "dev" / "kvm"), "--wait-kvm=30", "--", "true"]
    )
    assert result.returncode == 66 and "waiting" not in result.stderr, result.stderr


@pytest.mark.vm
def test_losing_the_kvm_device_while_the_vm_runs_is_logged(
    guest_assets: guest.GuestAssets, tmp_path: Path, background: Callable[..., Streams]
) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "dev").mkdir()
    device = tmp_path / "dev" / "kvm"
    mknod(device, 0o600)
    sup = background(
        [*_args(tmp_path, "lose-kvm", device), "-v", "--", "sh", "-c", "echo GUEST-READY; sleep 600"]
    )
    sup.wait_for('"watching the KVM device"')
    device.unlink()
    gone = sup.wait_for("the KVM device disappeared")[-1]
    assert gone["device"] == str(device) and gone["accel"] == "tcg"
    assert gone["level"] == "info"  # under TCG the VM does not use it: information, not a warning
    Path("/sys/class/misc/kvm/uevent").write_text("change")
    uevent = sup.wait_for('"kvm device uevent"')[-1]
    assert (uevent["action"], uevent["source"]) == ("change", "kernel")
    mknod(device, 0o600)
    assert sup.wait_for("the KVM device appeared")[-1]["device"] == str(device)
    sup.sup.signal(signal.SIGTERM)
    code, stderr = sup.finish()
    assert code == 128 + signal.SIGTERM, stderr
    assert wait_until_gone("lose-kvm") == [] and leftovers(tmp_path / "rt") == []
    assert stat.S_ISCHR(device.stat().st_mode)
