"""The KVM device node as an async stream of changes; waiting for it; watching it while a VM runs.

Two kinds of news, because neither alone sees everything:
- the kvm misc device's uevents (module loaded or unloaded, `change`), from pyudev netlink monitors
  on both sources: `udev` (hosts where udevd runs and re-broadcasts) and `kernel` (everywhere else:
  containers and minimal hosts, where the `udev` source stays silent);
- the node itself (created, removed, chmod, chown, an ACL set), from inotify: on its directory (a
  node made by mknod or devtmpfs) and on the node (a node bind-mounted into a container, whose
  directory never changes). Netlink knows nothing about a node's permissions.
All fds are gathered in one epoll fd, so the stream is one `anyio.wait_readable` with no task and no
thread. After each batch the node is read again and only real differences are reported, so the
duplicates the sources produce for one change collapse into one event.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import math
import select
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
import structlog

from supervisor import kvm
from supervisor.config import Accel
from supervisor.errors import ExitCode, SupervisorError
from supervisor.inotify import (
    IN_ATTRIB,
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    Inotify,
)
from supervisor.kvm import NodeState

NETLINK_SOURCES = ("udev", "kernel")


class Change(enum.StrEnum):
    UEVENT = "uevent"  # a uevent of the kvm device; `action` says which
    APPEARED = "appeared"
    DISAPPEARED = "disappeared"
    CHANGED = "changed"  # mode, owner, group, ACL, access or device numbers


@dataclass(frozen=True)
class KvmEvent:
    change: Change
    source: str  # "udev", "kernel" or "inotify"
    state: NodeState  # the node after the change
    action: str | None = None  # the uevent's ACTION (add, remove, change, ...)

    def describe(self) -> str:
        if self.change is Change.UEVENT:
            return f"uevent '{self.action}' from the {self.source} source"
        return f"{self.change.value}: {self.state.describe()}"


class KvmWatch:
    """`with KvmWatch(path) as watch: async for event in watch: ...`; `watch.state` is the latest.

    Watches are set up before the node is first read, so a change between the two is not lost.
    """

    def __init__(self, device: Path, *, sources: tuple[str, ...] = NETLINK_SOURCES) -> None:
        self.device = device
        self.state = NodeState(exists=False)
        self.sources: list[str] = []  # the netlink sources actually listening
        self.unavailable: dict[str, str] = {}  # source -> why it is not listening
        self._wanted = sources
        self._monitors: dict[int, tuple[str, Any]] = {}
        self._inotify: Inotify | None = None
        self._epoll: select.epoll | None = None
        self._pending: collections.deque[KvmEvent] = collections.deque()

    def __enter__(self) -> KvmWatch:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open(self) -> None:
        if not self.device.parent.is_dir():
            raise SupervisorError(
                f"cannot watch {self.device}: its directory {self.device.parent} does not exist; fix "
                "kvm-device in the config (or --kvm-device)",
                exit_code=ExitCode.NO_INPUT,
            )
        self._epoll = select.epoll(flags=select.EPOLL_CLOEXEC)
        self._inotify = Inotify()
        self._inotify.add_watch(
            self.device.parent, IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
        )
        self._epoll.register(self._inotify.fd, select.EPOLLIN)
        self._open_netlink()
        self.state = self._read_node()

    def _open_netlink(self) -> None:
        try:
            import pyudev
        except ImportError as exc:  # libudev missing: inotify alone still sees the node
            self.unavailable = {source: f"pyudev unavailable ({exc})" for source in self._wanted}
            return
        try:
            context = pyudev.Context()
        except (OSError, ImportError) as exc:
            self.unavailable = {source: f"libudev unavailable ({exc})" for source in self._wanted}
            return
        for source in self._wanted:
            try:
                monitor = pyudev.Monitor.from_netlink(context, source=source)
                monitor.filter_by("misc")
                monitor.start()
            except (OSError, ValueError) as exc:  # e.g. netlink refused inside a sandbox
                self.unavailable[source] = str(exc)
                continue
            assert self._epoll is not None
            self._epoll.register(monitor.fileno(), select.EPOLLIN)
            self._monitors[monitor.fileno()] = (source, monitor)
            self.sources.append(source)

    def _read_node(self) -> NodeState:
        state = kvm.node_state(self.device)
        if state.exists and self._inotify is not None:
            # The node's own inode: sees chmod/chown/ACL of a node bind-mounted from elsewhere.
            # Adding a watch for an inode already watched just returns its watch descriptor.
            with contextlib.suppress(OSError):  # gone again already: the directory watch reports that
                self._inotify.add_watch(self.device, IN_ATTRIB | IN_DELETE_SELF)
        return state

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        # pyudev has no close(): a Monitor closes its socket when its last reference goes.
        self._monitors.clear()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def __aiter__(self) -> KvmWatch:
        return self

    async def __anext__(self) -> KvmEvent:
        while not self._pending:
            if self._epoll is None:
                raise StopAsyncIteration
            await anyio.wait_readable(self._epoll.fileno())
            self._drain()
        return self._pending.popleft()

    def _drain(self) -> None:
        assert self._epoll is not None and self._inotify is not None
        source = ""
        for fd, _mask in self._epoll.poll(0):
            if fd == self._inotify.fd:
                if self._inotify.read_nowait():
                    source = "inotify"
                continue
            name, monitor = self._monitors[fd]
            while True:
                try:
                    device = monitor.poll(timeout=0)
                except OSError:  # ENOBUFS after a burst of uevents: the node is re-read below anyway
                    break
                if device is None:
                    break
                if device.sys_name == "kvm":
                    self._pending.append(KvmEvent(Change.UEVENT, name, self.state, action=device.action))
                    source = source or name
        if not source:
            return
        before, after = self.state, self._read_node()
        self.state = after
        if before == after:
            return
        if after.exists and not before.exists:
            change = Change.APPEARED
        elif before.exists and not after.exists:
            change = Change.DISAPPEARED
        else:
            change = Change.CHANGED
        self._pending.append(KvmEvent(change, source, after))


async def wait_for_device(device: Path, *, timeout: float) -> NodeState:
    """Until `device` exists and this user may open it read-write; `timeout` math.inf waits forever.

    Returns at once when it already does. The node is usually created 0600 root first and given its
    group a moment later (by udev), so "appeared" alone is not enough to stop waiting.
    """
    log = structlog.get_logger().bind(device=str(device))
    with KvmWatch(device) as watch:
        if watch.state.exists and watch.state.rw:
            return watch.state
        log.warning(
            "waiting for the KVM device",
            state=watch.state.describe(),
            timeout_s=timeout if timeout < math.inf else None,
            sources=",".join(["inotify", *watch.sources]),
        )
        started = anyio.current_time()
        with anyio.move_on_after(timeout):
            async for event in watch:
                log.info("kvm device event", what=event.describe())
                if event.state.exists and event.state.rw:
                    log.warning("the KVM device is ready", waited_s=round(anyio.current_time() - started, 3))
                    return event.state
        state = watch.state
    if not state.exists:
        raise SupervisorError(
            f"{device} did not appear within {timeout:g} s (--wait-kvm={timeout:g}): load the kvm module "
            "(modprobe kvm_intel or kvm_amd) or pass the device into the container (--device /dev/kvm), "
            "then start again; or leave out --wait-kvm to start without KVM now (accel auto uses TCG)",
            exit_code=ExitCode.UNAVAILABLE,
        )
    raise SupervisorError(
        f"{device} exists but was still not readable and writable by this user after {timeout:g} s "
        f"(--wait-kvm={timeout:g}; {state.describe()}): {kvm.access_remedy(device, state)}",
        exit_code=ExitCode.UNAVAILABLE,
    )


async def report_changes(device: Path, accel: Accel) -> None:
    """For the VM's task group: log the node disappearing, returning or changing while the VM runs.

    A running VM keeps working when the node goes (QEMU holds /dev/kvm open), but the next start
    will not get KVM: with KVM in use that is a warning, under TCG it is information.
    """
    log = structlog.get_logger().bind(device=str(device), accel=accel.value)
    in_use = accel is Accel.KVM
    # An observer must never take the VM down with it: any failure ends the watch, not the VM.
    try:
        watch = KvmWatch(device)
        # Opened in a worker thread: importing pyudev and binding its monitors takes tens of ms
        # that the loop needs right then, for the VM that just started (issue 17: a runner that
        # exits at once was noticed only after them).
        await anyio.to_thread.run_sync(watch.__enter__)
        with watch:
            log.info(
                "watching the KVM device",
                state=watch.state.describe(),
                sources=",".join(["inotify", *watch.sources]),
            )
            async for event in watch:
                if event.change is Change.DISAPPEARED and in_use:
                    log.warning(
                        "the KVM device disappeared while the VM runs on KVM: this VM keeps running, "
                        "but a new start gets no KVM until it is back",
                        source=event.source,
                    )
                elif event.change is Change.DISAPPEARED:
                    log.info(
                        "the KVM device disappeared (not in use: the VM runs on TCG)", source=event.source
                    )
                elif event.change is Change.UEVENT:
                    log.info("kvm device uevent", action=event.action, source=event.source)
                else:
                    log.info(f"the KVM device {event.change.value}", state=event.state.describe())
    except Exception as exc:
        log.warning("stopped watching the KVM device", error=repr(exc))
