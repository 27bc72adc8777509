"""Tap interfaces on a host bridge: checked while planning, created at start, removed at the end.

A tap here is *persistent* (TUNSETPERSIST): it exists before the runner opens it by name (a
microvm.nix runner's `-netdev tap,ifname=...` can only open one that exists, and an unprivileged
runner could not create it), so it does not vanish with the runner's fd and must be removed by us.
Three paths remove it, from the most to the least orderly:

- `attached`: the context the instance's task groups nest in; its exit (normal end, error,
  cancellation) deletes the tap, shielded from cancellation.
- the watchdog (watchdog.py), after a SIGKILL of the supervisor: `remove_owned` with the
  supervisor's pid.
- the next start: `remove_stale` deletes every tap whose owner is dead (the watchdog was killed too,
  the machine's pid namespace was torn down...).

Ownership is written on the link itself, as its alias (IFLA_IFALIAS): `agentvm-supervise INSTANCE
PID START_TICKS`. It lives exactly as long as the link and in the link's own network namespace, so
no state file can disagree with it; the start ticks tell a reused pid from the supervisor.

Netlink through pyroute2 (not `ip` in a subprocess): typed errors (errno) instead of parsing `ip`'s
messages, one socket instead of a process per step, and tap creation (an ioctl on /dev/net/tun) in
the same call. It is imported on first use (that costs about 0.25 s). Its synchronous IPRoute runs
its own asyncio loop, so inside ours it is called from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio

from supervisor.children import read_start_ticks
from supervisor.errors import ExitCode, SupervisorError

MARK = "agentvm-supervise"
BRIDGE_MARK = "agentvm-supervise bridge"  # the alias of a bridge we created (bridge-create)
IFNAMSIZ = 15  # usable characters of an interface name (IFNAMSIZ 16 with the NUL)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
CAP_NET_ADMIN = 12
TUN_DEVICE = Path("/dev/net/tun")


class TapGuard(Protocol):
    """What the watchdog offers: remove this tap if the supervisor is killed."""

    def guard_tap(self, name: str) -> None: ...

    def release_tap(self, name: str) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TapSpec:
    name: str
    bridge: str
    uid: int  # the tap's owner: the user the runner runs as, who opens it by name
    gid: int
    multi_queue: bool = False  # must match what the runner asks for (QEMU: queues=N>1)
    vnet_hdr: bool = True  # QEMU and cloud-hypervisor both use the virtio-net header
    origin: str = "network.tap"  # where the name came from, for errors
    # network.bridge-create: the bridge is made with this address when missing, and removed with
    # the last tap of ours on it
    bridge_address: ipaddress.IPv4Interface | None = None
    nat: bool = False  # network.nat: the bridge made here masquerades its subnet (nftables)


@dataclass(frozen=True)
class Owner:
    """Who created a tap, as written in its alias."""

    instance: str
    pid: int
    start_ticks: int

    def alias(self) -> str:
        return f"{MARK} {self.instance} {self.pid} {self.start_ticks}"

    @classmethod
    def parse(cls, alias: str | None) -> Owner | None:
        parts = (alias or "").split()
        if len(parts) != 4 or parts[0] != MARK or not parts[2].isdigit() or not parts[3].isdigit():
            return None
        return cls(parts[1], int(parts[2]), int(parts[3]))

    def alive(self) -> bool:
        """The supervisor that wrote this is still running (not a zombie, not a reused pid)."""
        try:
            data = Path(f"/proc/{self.pid}/stat").read_bytes()
        except OSError:
            return False
        fields = data[data.rindex(b")") + 2 :].split()
        return fields[0] != b"Z" and int(fields[19]) == self.start_ticks


def default_name(vm_name: str) -> str:
    """As seed 003 names them: "mv" and 11 hex digits of the VM name's sha256 (15 characters)."""
    return "mv" + hashlib.sha256(vm_name.encode()).hexdigest()[:11]


def guest_mac(vm_name: str) -> str:
    """A stable, locally administered unicast MAC per VM name: two VMs on a bridge must differ
    (QEMU gives every NIC 52:54:00:12:34:56), and one VM keeps its MAC (neighbour caches stay right)."""
    digest = hashlib.sha256(b"mac:" + vm_name.encode()).digest()
    return ":".join(f"{byte:02x}" for byte in (0x02, *digest[:5]))


def check_name(name: str, origin: str) -> None:
    if not NAME_PATTERN.match(name):
        raise SupervisorError(
            f"{origin} '{name}' is not a usable interface name: Linux allows at most {IFNAMSIZ} "
            "characters; use letters, digits, '_', '.' and '-', starting with a letter or digit "
            "(or leave it out: the default is derived from the VM's name)",
        )


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


@contextlib.contextmanager
def _netlink() -> Iterator[Any]:
    # imported here: pyroute2 takes about 0.25 s to import, which only tap networks should pay
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        yield ip


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    error: type[Exception] = NetlinkError
    return error


def _link(ip: Any, name: str) -> Any | None:
    try:
        found = ip.link("get", ifname=name)
    except _netlink_error() as exc:
        if getattr(exc, "code", None) == errno.ENODEV:
            return None
        raise
    return found[0] if found else None


def _kind(link: Any) -> str | None:
    kind: str | None = link.get(("linkinfo", "kind"))
    return kind


def exists(name: str) -> bool:
    """Whether an interface of that name exists (needs no privileges)."""
    with _netlink() as ip:
        return _link(ip, name) is not None


@dataclass(frozen=True)
class Bridge:
    name: str
    networks: tuple[ipaddress.IPv4Interface, ...]  # its IPv4 addresses with their prefixes


def inspect_bridge(name: str) -> Bridge:
    """The bridge's IPv4 addresses; raises when it does not exist or is not a bridge."""
    with _netlink() as ip:
        link = _link(ip, name)
        if link is None:
            raise SupervisorError(
                f"the bridge '{name}' (network.bridge) does not exist in this network namespace: create it "
                f"(ip link add {name} type bridge; ip addr add ADDRESS/PREFIX dev {name}; ip link set {name} "
                "up, or networking.bridges on NixOS), or fix network.bridge",
                exit_code=ExitCode.UNAVAILABLE,
            )
        if _kind(link) != "bridge":
            raise SupervisorError(
                f"network.bridge names '{name}', which is a {_kind(link) or 'plain'} interface, not a "
                "bridge: name the bridge the VMs' taps join",
            )
        addresses = ip.get_addr(family=2, index=link["index"])
    networks = tuple(
        ipaddress.IPv4Interface(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}") for addr in addresses
    )
    return Bridge(name, networks)


def check_free(spec: TapSpec) -> None:
    """Raise when the tap's name is taken by a running VM or by something not ours; a stale tap of a
    dead instance is fine (`attached` removes it)."""
    with _netlink() as ip:
        link = _link(ip, spec.name)
    if link is None:
        return
    owner = Owner.parse(link.get("IFLA_IFALIAS"))
    if owner is None:
        raise SupervisorError(
            f"the tap name '{spec.name}' ({spec.origin}) is in use by an interface agentvm-supervise did "
            f"not create ({_kind(link) or 'kind unknown'}): choose another name with {spec.origin}, or "
            f"remove that interface (ip link del {spec.name}) if nothing needs it",
        )
    if owner.alive():
        raise SupervisorError(
            f"the tap name '{spec.name}' ({spec.origin}) is in use by the running VM {owner.instance} "
            f"(supervisor pid {owner.pid}): stop that VM first (agentvm-supervise stop "
            f"{owner.instance}), or give this one its own tap with {spec.origin} (or its own name)",
        )


def check_host(specs: Sequence[TapSpec]) -> None:
    """What creating the taps needs from the host, checked before anything exists."""
    if not has_net_admin():
        raise SupervisorError(
            f"a tap network ('{specs[0].name}' on bridge '{specs[0].bridge}') needs CAP_NET_ADMIN to "
            "create the tap and attach it to the bridge, and this process does not have it: run "
            "agentvm-supervise as root, or grant it the capability (e.g. systemd's "
            'AmbientCapabilities=CAP_NET_ADMIN), or use network mode "user"',
            exit_code=ExitCode.UNAVAILABLE,
        )
    if not TUN_DEVICE.exists():
        raise SupervisorError(
            f"{TUN_DEVICE} does not exist, so no tap can be created: load the tun module (modprobe "
            "tun) or, in a container, pass the device in (--device /dev/net/tun)",
            exit_code=ExitCode.UNAVAILABLE,
        )
    names = [spec.name for spec in specs]
    for spec in specs:
        if names.count(spec.name) > 1:
            raise SupervisorError(
                f"two interfaces of this VM use the tap name '{spec.name}': give each its own"
            )
        if spec.bridge_address is None or exists(spec.bridge):
            inspect_bridge(spec.bridge)
        check_free(spec)


@contextlib.contextmanager
def _bridge_lock() -> Iterator[None]:
    """Serialises making and removing our bridges between supervisors (one start must not attach
    to a bridge another's teardown is deleting)."""
    directory = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path("/tmp")
    fd = os.open(directory / "agentvm-supervise-bridges.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _make_bridge(ip: Any, spec: TapSpec) -> None:
    assert spec.bridge_address is not None
    ip.link("add", ifname=spec.bridge, kind="bridge")
    index = ip.link_lookup(ifname=spec.bridge)[0]
    ip.link("set", index=index, ifalias=BRIDGE_MARK)
    address = spec.bridge_address
    ip.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
    ip.link("set", index=index, state="up")
    if spec.nat:
        _add_nat(spec.bridge, address.network)


def _nat_table(bridge: str) -> str:
    return f"agentvm-{bridge}"


def _add_nat(bridge: str, subnet: ipaddress.IPv4Network) -> None:
    """What seed 003's networking.nat does for its bridge: masquerade the subnet's traffic that
    leaves it, in a table of our own (removed with the bridge), and turn IPv4 forwarding on (left
    on: other things on the host may rely on it by then)."""
    from pyroute2.netlink.nfnetlink.nftsocket import Cmp
    from pyroute2.nftables.expressions import ipv4addr, masq
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=socket.AF_INET)
    try:
        table = _nat_table(bridge)
        nft.table("add", name=table)
        nft.chain(
            "add", table=table, name="postrouting", hook="postrouting", type="nat", policy=1, priority=100
        )
        # ip saddr SUBNET ip daddr != SUBNET masquerade
        nft.rule(
            "add",
            table=table,
            chain="postrouting",
            expressions=(ipv4addr(src=str(subnet)), ipv4addr(dst=str(subnet), op=Cmp.NFT_CMP_NEQ), masq()),
        )
    finally:
        nft.close()
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def _remove_nat(bridge: str) -> None:
    from pyroute2.nftables.main import NFTables

    nft = NFTables(nfgen_family=socket.AF_INET)
    try:
        if any(t.get("NFTA_TABLE_NAME") == _nat_table(bridge) for t in nft.get_tables()):
            nft.table("del", name=_nat_table(bridge))
    finally:
        nft.close()


def release_bridge(name: str | None) -> bool:
    """Delete the bridge `name` if we created it and no interface is attached to it any more."""
    if name is None:
        return False
    with _bridge_lock(), _netlink() as ip:
        link = _link(ip, name)
        if link is None or link.get("IFLA_IFALIAS") != BRIDGE_MARK:
            return False
        if any(port.get("IFLA_MASTER") == link["index"] for port in ip.get_links()):
            return False
        with contextlib.suppress(_netlink_error()):
            ip.link("del", index=link["index"])
            _remove_nat(name)
            return True
    return False


def _bridge_index(ip: Any, name: str) -> int:
    link = _link(ip, name)
    if link is None or _kind(link) != "bridge":
        raise SupervisorError(
            f"the bridge '{name}' disappeared (or is no bridge) between the checks and the start: "
            "create it again, then start the VM again",
            exit_code=ExitCode.UNAVAILABLE,
        )
    index: int = link["index"]
    return index


def create(spec: TapSpec, owner: Owner) -> None:
    """Create the tap (removing a stale one of the same name), mark it ours, attach it, bring it up.
    On any failure the half-made tap is removed before the error is raised."""
    with _netlink() as ip:
        old = _link(ip, spec.name)
        if old is not None:
            found = Owner.parse(old.get("IFLA_IFALIAS"))
            if found is None or found.alive():
                check_free(spec)  # raises the error naming who holds it
            ip.link("del", index=old["index"])
    with _bridge_lock(), _netlink() as ip:  # the bridge cannot go away between here and the attach
        made_bridge = spec.bridge_address is not None and _link(ip, spec.bridge) is None
        if made_bridge:
            _make_bridge(ip, spec)
        try:
            _add_tap(ip, spec, owner, _bridge_index(ip, spec.bridge))
        except BaseException:
            if made_bridge:  # nothing else can be on it: we hold the lock
                with contextlib.suppress(_netlink_error(), IndexError):
                    ip.link("del", index=ip.link_lookup(ifname=spec.bridge)[0])
                    _remove_nat(spec.bridge)
            raise


def _add_tap(ip: Any, spec: TapSpec, owner: Owner, bridge: int) -> None:
    ip.link(
        "add",
        ifname=spec.name,
        kind="tuntap",
        mode="tap",
        uid=spec.uid,
        gid=spec.gid,
        ifr={"no_pi": True, "vnet_hdr": spec.vnet_hdr, "multi_queue": spec.multi_queue},
    )
    try:
        index = ip.link_lookup(ifname=spec.name)[0]
        # the mark first: from here on every cleanup path recognises the tap as ours
        ip.link("set", index=index, ifalias=owner.alias())
        ip.link("set", index=index, master=bridge)
        ip.link("set", index=index, state="up")
    except BaseException:
        with contextlib.suppress(_netlink_error(), IndexError):
            ip.link("del", index=ip.link_lookup(ifname=spec.name)[0])
        raise


def remove_owned(name: str, pid: int) -> bool:
    """Delete the tap `name` if the supervisor `pid` created it; False if it was not there (or not its).
    A bridge we created goes with the last tap on it."""
    with _netlink() as ip:
        link = _link(ip, name)
        owner = Owner.parse(link.get("IFLA_IFALIAS")) if link is not None else None
        if link is None or owner is None or owner.pid != pid:
            return False
        master = link.get("IFLA_MASTER")
        bridge = ip.get_links(master)[0].get("IFLA_IFNAME") if master else None
        try:
            ip.link("del", index=link["index"])
        except _netlink_error() as exc:
            if getattr(exc, "code", None) != errno.ENODEV:
                raise
            return False
    release_bridge(bridge)
    return True


def remove_stale() -> list[str]:
    """Delete every tap whose creator is no longer running; the names removed."""
    removed = []
    with _netlink() as ip:
        for link in ip.get_links():
            owner = Owner.parse(link.get("IFLA_IFALIAS"))
            if owner is None or owner.alive():
                continue
            with contextlib.suppress(_netlink_error()):
                ip.link("del", index=link["index"])
                removed.append(str(link.get("IFLA_IFNAME")))
        bridges = [
            str(link.get("IFLA_IFNAME")) for link in ip.get_links() if link.get("IFLA_IFALIAS") == BRIDGE_MARK
        ]
    for bridge in bridges:
        release_bridge(bridge)
    return removed


@contextlib.asynccontextmanager
async def attached(specs: Sequence[TapSpec], owner: Owner, guard: TapGuard, log: Any) -> AsyncIterator[None]:
    """The taps exist, on their bridges, for the body's duration; removed however it ends."""
    if not specs:
        yield
        return
    for name in await anyio.to_thread.run_sync(remove_stale):
        log.info("removed a stale tap of a dead instance", tap=name)
    made: list[TapSpec] = []
    try:
        for spec in specs:
            guard.guard_tap(spec.name)  # before it exists: a SIGKILL during create leaves none
            await anyio.to_thread.run_sync(create, spec, owner)
            made.append(spec)
            log.info("tap created", tap=spec.name, bridge=spec.bridge, uid=spec.uid)
        yield
    finally:
        with anyio.CancelScope(shield=True):
            for spec in reversed(made):
                gone = await anyio.to_thread.run_sync(remove_owned, spec.name, owner.pid)
                log.info("tap removed" if gone else "tap already gone", tap=spec.name)
            for spec in specs:
                guard.release_tap(spec.name)


def current_owner(instance: str) -> Owner:
    pid = os.getpid()
    return Owner(instance, pid, read_start_ticks(pid))


def _main(argv: Sequence[str]) -> int:
    """`python -m supervisor.tap PID NAME...`: the watchdog's helper after a SIGKILL of supervisor PID."""
    pid, *names = argv
    for name in names:
        with contextlib.suppress(Exception):  # one tap that cannot go must not keep the others
            remove_owned(name, int(pid))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
