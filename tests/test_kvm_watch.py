"""The KVM watcher with real uevents (written to /sys/class/misc/kvm/uevent) and a real device node
(mknod 10:232 at a test path): each change is reported once, from the source that saw it."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from supervisor import kvm
from supervisor.config import Accel
from supervisor.errors import SupervisorError
from supervisor.kvm_watch import Change, KvmEvent, KvmWatch

pytestmark = pytest.mark.anyio

UEVENT = Path("/sys/class/misc/kvm/uevent")
DEADLINE = 20.0  # generous: the machine is shared; events arrive in well under a millisecond


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def node_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "dev"
    path.mkdir()
    yield path


def mknod(path: Path, mode: int = 0o600) -> None:
    os.mknod(path, stat.S_IFCHR | mode, os.makedev(kvm.KVM_MAJOR, kvm.KVM_MINOR))
    path.chmod(mode)  # mknod's mode is filtered by the umask


def acl_granting(uid: int) -> bytes:
    """A system.posix_acl_access value (what setfacl writes): user `uid` gets rw, mask rw."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 6, uid), (0x04, 0, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF)]
    entries.append((0x20, 0, 0xFFFFFFFF))
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


async def next_event(watch: KvmWatch, wanted: Callable[[KvmEvent], bool] = lambda _: True) -> KvmEvent:
    with anyio.fail_after(DEADLINE):
        async for event in watch:
            if wanted(event):
                return event
    raise AssertionError("the watch ended")


async def no_event_within(watch: KvmWatch, seconds: float) -> None:
    with anyio.move_on_after(seconds):
        event = await watch.__anext__()
        raise AssertionError(f"unexpected event: {event}")


async def test_listens_on_both_netlink_sources(node_dir: Path) -> None:
    with KvmWatch(node_dir / "kvm") as watch:
        assert watch.sources == ["udev", "kernel"], watch.unavailable
        assert watch.state == kvm.NodeState(exists=False)


@pytest.mark.parametrize("action", ["change", "add"])
async def test_a_real_kernel_uevent_is_reported(node_dir: Path, action: str) -> None:
    with KvmWatch(node_dir / "kvm") as watch:
        UEVENT.write_text(action)
        event = await next_event(watch, lambda e: e.change is Change.UEVENT and e.action == action)
    # No udevd runs here: the kernel source is the one that hears it.
    assert event.source == "kernel"


async def test_node_created_chmodded_chowned_acl_removed_and_recreated(node_dir: Path) -> None:
    node = node_dir / "kvm"
    with KvmWatch(node) as watch:
        mknod(node, 0o600)
        event = await next_event(watch)
        assert (event.change, event.source) == (Change.APPEARED, "inotify")
        assert event.state.is_kvm and event.state.mode == 0o600 and event.state.rw

        node.chmod(0o660)
        event = await next_event(watch)
        assert (event.change, event.state.mode) == (Change.CHANGED, 0o660)

        os.chown(node, 0, 4242)
        event = await next_event(watch)
        assert (event.change, event.state.gid) == (Change.CHANGED, 4242)

        os.setxattr(node, "system.posix_acl_access", acl_granting(4243))
        event = await next_event(watch)
        assert event.change is Change.CHANGED and event.state.acl is not None
        assert "with an ACL" in event.describe()

        node.unlink()
        event = await next_event(watch)
        assert (event.change, event.state.exists) == (Change.DISAPPEARED, False)

        mknod(node, 0o600)
        event = await next_event(watch)
        assert (event.change, event.state.mode, event.state.acl) == (Change.APPEARED, 0o600, None)
        # One change, one event: the directory's and the node's own inotify events collapsed.
        await no_event_within(watch, 0.3)


async def test_a_bind_mounted_node_is_watched_through_its_inode(tmp_path: Path) -> None:
    """A container's /dev/kvm is a bind mount: a chmod on the host never touches the container's /dev."""
    host_dev, container_dev = tmp_path / "host", tmp_path / "container"
    host_dev.mkdir()
    container_dev.mkdir()
    mknod(host_dev / "kvm", 0o600)
    (container_dev / "kvm").touch()
    subprocess.run(["mount", "--bind", str(host_dev / "kvm"), str(container_dev / "kvm")], check=True)
    try:
        with KvmWatch(container_dev / "kvm") as watch:
            assert watch.state.is_kvm
            (host_dev / "kvm").chmod(0o666)
            event = await next_event(watch)
            assert (event.change, event.source, event.state.mode) == (Change.CHANGED, "inotify", 0o666)
    finally:
        subprocess.run(["umount", str(container_dev / "kvm")], check=True)


async def test_watching_a_path_whose_directory_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError, match=r"its directory .* does not exist; fix kvm-device"):
        KvmWatch(tmp_path / "nope" / "kvm").__enter__()


def test_assessment_of_a_node_at_a_test_path(node_dir: Path, tmp_path: Path) -> None:
    """On this PVM host a real 10:232 node anywhere is KVM that answers, but is not usable."""
    node = node_dir / "kvm"
    mknod(node)
    found = kvm.assess_kvm(node)
    assert not found.usable and found.api_version == 12 and "kvm_pvm is loaded" in found.reason
    assert kvm.choose_accel(Accel.AUTO, found)[0] is Accel.TCG
    assert kvm.choose_accel(Accel.KVM, found)[0] is None

    # The stock-guest rules on their own, with the host facts injected: a KVM with vmx and no PVM.
    cpuinfo, modules = tmp_path / "cpuinfo", tmp_path / "modules"
    cpuinfo.write_text("processor : 0\nflags : fpu vme vmx sse2\n")
    modules.mkdir()
    usable = kvm.assess_kvm(node, cpuinfo=cpuinfo, sys_module=modules, qemu_device=Path("/dev/kvm"))
    assert usable.usable and kvm.choose_accel(Accel.AUTO, usable)[0] is Accel.KVM
    # QEMU opens /dev/kvm whatever kvm-device says: a custom node alone is not enough.
    elsewhere = kvm.assess_kvm(node, cpuinfo=cpuinfo, sys_module=modules, qemu_device=node_dir / "absent")
    assert not elsewhere.usable and "QEMU always opens" in elsewhere.reason
    cpuinfo.write_text("processor : 0\nflags : fpu vme sse2\n")
    no_flags = kvm.assess_kvm(node, cpuinfo=cpuinfo, sys_module=modules, qemu_device=Path("/dev/kvm"))
    assert not no_flags.usable and "vmx or svm" in no_flags.reason


def test_a_node_that_is_not_kvm(node_dir: Path) -> None:
    node = node_dir / "kvm"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    found = kvm.assess_kvm(node)
    assert (found.usable, found.stage) == (False, "device")
    assert "is not the KVM device" in found.reason and f"mknod {node} c 10 232" in found.remedy
