"""The guest's network: QEMU's user-mode networking (libslirp) and what the built-in guest is told.

Both ends are decided here, so they cannot disagree: the `-netdev user` QEMU gets (addresses, port
forwards) and the `agentvm.net=` argument the built-in guest's /init reads to set up eth0
(guest/init-lib.sh, `net_up`). The guest's address is static, not DHCP: slirp's addresses are ours to
choose (they are set on the netdev below), a static setup needs no AF_PACKET module or udhcpc
script in the initramfs, costs no DHCP round trip at boot, and keeps working when the netdev is
restricted (`restrict=on` drops every guest UDP packet but DHCP's, and DNS with it).

Mode "tap" (supervisor/tap.py owns the host side): the NIC is a tap on a host bridge, the guest has
a static address in the bridge's subnet, and the same `agentvm.net=` tells the built-in guest.

The egress work hooks in here: another `NetMode` (no NIC at all, or a restricted netdev with a
proxy), its extra netdev options in `qemu_args`, and what the guest must know in `kernel_args`.
QEMU runs under `-sandbox ...,spawn=deny` (qemu.SANDBOX) except in the allowlist mode, whose
per-connection `guestfwd=...-cmd:` handoff needs spawn (qemu.sandbox_options; why a chardev
guestfwd cannot carry a proxy's connections: supervisor/egress/__init__.py).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from supervisor import tap
from supervisor.config import Network, NetworkMode
from supervisor.errors import SupervisorError
from supervisor.launcher import Forward

NETDEV_ID = "agentvm-net"
# slirp's own defaults, written out: the guest is configured with exactly these.
NETWORK = ipaddress.IPv4Network("10.0.2.0/24")
GUEST_ADDRESS = ipaddress.IPv4Address("10.0.2.15")  # where hostfwd= rules without an address go
HOST_ADDRESS = ipaddress.IPv4Address("10.0.2.2")  # the gateway; slirp maps it to the host's 127.0.0.1
DNS_ADDRESS = ipaddress.IPv4Address("10.0.2.3")  # slirp's DNS forwarder (the host's resolver)


class NetMode(enum.Enum):
    USER = "user"  # slirp NAT: the guest reaches what the host reaches, the host reaches forwards
    TAP = "tap"  # a tap on a host bridge (TapNetwork)


class RunnerTapLike(Protocol):
    """runner.RunnerTap (network.py is imported by runner's users, not the other way round)."""

    @property
    def name(self) -> str: ...

    @property
    def multi_queue(self) -> bool: ...


@dataclass(frozen=True)
class TapNetwork:
    """The guest's side of a tap network and the tap it needs on the host."""

    tap: tap.TapSpec
    mac: str
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    dns: ipaddress.IPv4Address


@dataclass(frozen=True)
class GuestNetwork:
    mode: NetMode
    forwards: tuple[Forward, ...] = ()
    configure_guest: bool = True  # the built-in guest sets eth0 up; another kernel does its own
    restrict: tuple[str, ...] = ()  # egress allowlist: restrict=on and the proxy's guestfwd (egress/)
    tap: TapNetwork | None = None  # mode TAP

    def qemu_args(self, bus: str) -> list[str]:
        """`-netdev` and `-device` for QEMU; `bus` is "pci" (q35) or "device" (microvm, virtio-mmio)."""
        # romfile= : no PXE option ROM (Debian ships none without ipxe-qemu, and nothing netboots)
        device = f"virtio-net-{bus},netdev={NETDEV_ID}" + (",romfile=" if bus == "pci" else "")
        if self.tap is not None:
            # script=no: the supervisor made the tap and put it on the bridge (tap.py)
            tap_netdev = f"tap,id={NETDEV_ID},ifname={self.tap.tap.name},script=no,downscript=no"
            return ["-netdev", tap_netdev, "-device", f"{device},mac={self.tap.mac}"]
        netdev = [
            "user",
            f"id={NETDEV_ID}",
            f"net={NETWORK}",
            f"host={HOST_ADDRESS}",
            f"dns={DNS_ADDRESS}",
            f"dhcpstart={GUEST_ADDRESS}",  # a guest that asks DHCP anyway gets the same address
            *(forward.hostfwd() for forward in self.forwards),
            *self.restrict,
        ]
        return ["-netdev", ",".join(netdev), "-device", device]

    def kernel_args(self) -> list[str]:
        """What the built-in guest's /init reads: `agentvm.net=ADDRESS/PREFIX,GATEWAY,DNS`."""
        if not self.configure_guest:
            return []
        if self.tap is not None:
            return [f"agentvm.net={self.tap.address},{self.tap.gateway},{self.tap.dns}"]
        address = f"{GUEST_ADDRESS}/{NETWORK.prefixlen}"
        return [f"agentvm.net={address},{HOST_ADDRESS},{DNS_ADDRESS}"]


def plan_network(
    forwards: Sequence[Forward],
    *,
    builtin_guest: bool,
    egress: Sequence[str] | None = (),
    config: Network | None = None,
    vm_name: str = "",
) -> GuestNetwork | None:
    """The built-in guest always has the user-mode network (claude-microvm's guest has it too: the
    agent talks to its API); another kernel gets a NIC only when ports are forwarded to it or the
    egress proxy serves it. `egress` (egress.NetworkPlan.netdev_extra): None for no NIC at all
    (network mode "none"), else the netdev options of the mode (allowlist: restrict=on, guestfwd).
    Mode "tap" gives any guest a NIC on the bridge (checked on the host now: tap.check_host)."""
    if config is not None and config.mode is NetworkMode.TAP:
        if forwards:
            raise SupervisorError(
                'port forwards (forwards, --forward) need QEMU\'s user network (network mode "open" or '
                f'"allowlist"); with mode "tap" the host reaches the guest at its own address '
                f"({config.address}): remove the forwards",
            )
        return GuestNetwork(NetMode.TAP, tap=plan_tap(config, vm_name), configure_guest=builtin_guest)
    if config is not None:
        _no_tap_fields(config)
    if egress is None:
        return None
    if builtin_guest:
        return GuestNetwork(NetMode.USER, tuple(forwards), restrict=tuple(egress))
    if forwards or egress:
        return GuestNetwork(NetMode.USER, tuple(forwards), configure_guest=False, restrict=tuple(egress))
    return None


def _no_tap_fields(config: Network) -> None:
    tap_only = ("bridge", "address", "gateway", "dns", "tap", "mac")
    given = [name for name in tap_only if getattr(config, name) is not None]
    given += [name for name in ("bridge_create", "nat") if getattr(config, name)]
    if given:
        raise SupervisorError(
            f'network.{given[0]} is set, but it is for network mode "tap" and the mode is not: '
            'add mode = "tap" to [network], or remove it',
        )


def plan_tap(config: Network, vm_name: str, *, origin: str = "network.tap") -> TapNetwork:
    """Check a tap network's inputs against the host (the bridge, its subnet, the tap name) and the
    process's privileges; raises before anything is created."""
    if config.bridge is None:
        raise SupervisorError(
            'network mode "tap" needs network.bridge: the name of an existing host bridge (e.g. '
            '"microbr"; see docs/config.md for creating one)',
        )
    raw = config.address
    if raw is None:
        raise SupervisorError(
            "network mode \"tap\" needs network.address: the guest's static address in the bridge's "
            'subnet, with its prefix (e.g. "192.168.83.2/24")',
        )
    try:
        address = ipaddress.IPv4Interface(raw)
    except ValueError:
        raise SupervisorError(
            f"network.address '{raw}' is not an IPv4 address with a prefix: write it as \"192.168.83.2/24\"",
        ) from None
    if "/" not in raw:
        raise SupervisorError(
            f"network.address '{raw}' has no prefix length: write it as {raw}/24 (the bridge's prefix)",
        )
    name = config.tap or tap.default_name(vm_name)
    tap.check_name(name, origin)
    spec = tap.TapSpec(name=name, bridge=config.bridge, uid=os.geteuid(), gid=os.getegid(), origin=origin)
    if config.nat and not config.bridge_create:
        raise SupervisorError(
            "network.nat is for a bridge the supervisor creates (bridge-create = true); a bridge of the "
            "host has the host's NAT (networking.nat on NixOS): remove nat, or add bridge-create",
        )
    if config.bridge_create and not tap.exists(config.bridge):
        return _with_new_bridge(config, spec, address, vm_name)
    tap.check_host([spec])
    bridge = tap.inspect_bridge(config.bridge)
    on_bridge = [net for net in bridge.networks if address.ip in net.network]
    if bridge.networks and not on_bridge:
        subnets = ", ".join(str(net.network) for net in bridge.networks)
        raise SupervisorError(
            f"network.address {address} is outside the subnet of bridge '{bridge.name}' ({subnets}): "
            "the host and the other VMs could not reach it; choose an address in that subnet",
        )
    if any(address.ip == net.ip for net in bridge.networks):
        raise SupervisorError(
            f"network.address {address.ip} is the bridge '{bridge.name}''s own address: give the guest "
            "another address in that subnet",
        )
    gateway = _ipv4(config.gateway, "network.gateway")
    if gateway is None:
        if not on_bridge:
            raise SupervisorError(
                f"the bridge '{bridge.name}' has no IPv4 address to be the guest's gateway: set "
                "network.gateway, or give the bridge an address in the guest's subnet",
            )
        gateway = on_bridge[0].ip
    return _guest_side(config, spec, address, gateway, vm_name)


def _with_new_bridge(
    config: Network, spec: tap.TapSpec, address: ipaddress.IPv4Interface, vm_name: str = ""
) -> TapNetwork:
    """bridge-create and no bridge yet: it will get the gateway's address (default: the subnet's first)."""
    gateway = _ipv4(config.gateway, "network.gateway") or next(address.network.hosts())
    if gateway not in address.network or gateway == address.ip:
        raise SupervisorError(
            f"network.gateway {gateway} becomes the address of the bridge '{spec.bridge}' that "
            f"bridge-create makes: it must be another address in the guest's subnet {address.network}",
        )
    bridge_address = ipaddress.IPv4Interface(f"{gateway}/{address.network.prefixlen}")
    spec = dataclasses.replace(spec, bridge_address=bridge_address, nat=config.nat)
    tap.check_host([spec])
    return _guest_side(config, spec, address, gateway, vm_name)


def _guest_side(
    config: Network,
    spec: tap.TapSpec,
    address: ipaddress.IPv4Interface,
    gateway: ipaddress.IPv4Address,
    vm_name: str,
) -> TapNetwork:
    dns = _ipv4(config.dns, "network.dns") or gateway
    mac = config.mac or tap.guest_mac(vm_name)
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) or int(mac[:2], 16) & 1:
        raise SupervisorError(
            f"network.mac '{mac}' is not a unicast MAC address: write six hex pairs like "
            "02:00:00:01:ab:cd (the first pair even), or leave it out",
        )
    return TapNetwork(tap=spec, mac=mac, address=address, gateway=gateway, dns=dns)


def _ipv4(raw: str | None, what: str) -> ipaddress.IPv4Address | None:
    if raw is None:
        return None
    try:
        return ipaddress.IPv4Address(raw)
    except ValueError:
        raise SupervisorError(f"{what} '{raw}' is not an IPv4 address (e.g. 192.168.83.1)") from None


def plan_runner_taps(config: Network, taps: Sequence[RunnerTapLike]) -> tuple[tap.TapSpec, ...]:
    """A microvm.nix runner's tap interfaces: with mode "tap" the supervisor creates them on the
    bridge (checked now, as for its own); otherwise they must exist already (a NixOS host's
    microvm-tap-interfaces units made them)."""
    if config.mode is not NetworkMode.TAP:
        _no_tap_fields(config)
    if not taps:
        return ()
    names = ", ".join(t.name for t in taps)
    if config.mode is not NetworkMode.TAP:
        missing = [t.name for t in taps if not tap.exists(t.name)]
        if missing:
            raise SupervisorError(
                f"the runner opens the tap interface '{missing[0]}', which does not exist: set [network] "
                'mode = "tap" and bridge = "..." so that the supervisor creates it (and removes it at the '
                "end), or create it beforehand (NixOS: microvm.nix's host module does)",
            )
        return ()
    if config.bridge is None:
        raise SupervisorError(
            f'network mode "tap" with a runner needs network.bridge: the host bridge its taps ({names}) join',
        )
    if config.bridge_create or config.nat:
        raise SupervisorError(
            "network.bridge-create and nat are for the built-in guest (its address names the bridge's "
            "subnet); for a runner, create the bridge on the host (services.agentvm.network on NixOS) "
            "and remove them",
        )
    if config.address is not None or config.tap is not None:
        raise SupervisorError(
            "network.address and network.tap are for the built-in guest: a microvm.nix runner names its "
            "own taps and its NixOS configuration sets the guest's address; remove them",
        )
    specs = []
    for found in taps:
        tap.check_name(found.name, "the runner's -netdev ifname")
        specs.append(
            tap.TapSpec(
                name=found.name,
                bridge=config.bridge,
                uid=os.geteuid(),
                gid=os.getegid(),
                multi_queue=found.multi_queue,
                origin="the runner's ifname",
            )
        )
    tap.check_host(specs)
    return tuple(specs)
