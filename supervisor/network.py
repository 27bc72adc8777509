"""The guest's network: QEMU's user-mode networking (libslirp) and what the built-in guest is told.

Both ends are decided here, so they cannot disagree: the `-netdev user` QEMU gets (addresses, port
forwards) and the `agentvm.net=` argument the built-in guest's /init reads to set up eth0
(guest/init.sh, `net_up`). The guest's address is static, not DHCP: slirp's addresses are ours to
choose (they are set on the netdev below), a static setup needs no AF_PACKET module or udhcpc
script in the initramfs, costs no DHCP round trip at boot, and keeps working when the netdev is
restricted (`restrict=on` drops every guest UDP packet but DHCP's, and DNS with it).

The egress work hooks in here: another `NetMode` (no NIC at all, or a restricted netdev with a
proxy), its extra netdev options in `qemu_args`, and what the guest must know in `kernel_args`.
QEMU runs under `-sandbox ...,spawn=deny` (qemu.SANDBOX) except in the allowlist mode, whose
per-connection `guestfwd=...-cmd:` handoff needs spawn (qemu.sandbox_options; why a chardev
guestfwd cannot carry a proxy's connections: supervisor/egress/__init__.py).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from supervisor.launcher import Forward

NETDEV_ID = "agentvm-net"
# slirp's own defaults, written out: the guest is configured with exactly these.
NETWORK = ipaddress.IPv4Network("10.0.2.0/24")
GUEST_ADDRESS = ipaddress.IPv4Address("10.0.2.15")  # where hostfwd= rules without an address go
HOST_ADDRESS = ipaddress.IPv4Address("10.0.2.2")  # the gateway; slirp maps it to the host's 127.0.0.1
DNS_ADDRESS = ipaddress.IPv4Address("10.0.2.3")  # slirp's DNS forwarder (the host's resolver)


class NetMode(enum.Enum):
    USER = "user"  # slirp NAT: the guest reaches what the host reaches, the host reaches forwards


@dataclass(frozen=True)
class GuestNetwork:
    mode: NetMode
    forwards: tuple[Forward, ...] = ()
    configure_guest: bool = True  # the built-in guest sets eth0 up; another kernel does its own
    restrict: tuple[str, ...] = ()  # egress allowlist: restrict=on and the proxy's guestfwd (egress/)

    def qemu_args(self, bus: str) -> list[str]:
        """`-netdev` and `-device` for QEMU; `bus` is "pci" (q35) or "device" (microvm, virtio-mmio)."""
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
        # romfile= : no PXE option ROM (Debian ships none without ipxe-qemu, and nothing netboots)
        device = f"virtio-net-{bus},netdev={NETDEV_ID}" + (",romfile=" if bus == "pci" else "")
        return ["-netdev", ",".join(netdev), "-device", device]

    def kernel_args(self) -> list[str]:
        """What the built-in guest's /init reads: `agentvm.net=ADDRESS/PREFIX,GATEWAY,DNS`."""
        if not self.configure_guest:
            return []
        address = f"{GUEST_ADDRESS}/{NETWORK.prefixlen}"
        return [f"agentvm.net={address},{HOST_ADDRESS},{DNS_ADDRESS}"]


def plan_network(
    forwards: Sequence[Forward], *, builtin_guest: bool, egress: Sequence[str] | None = ()
) -> GuestNetwork | None:
    """The built-in guest always has the user-mode network (claude-microvm's guest has it too: the
    agent talks to its API); another kernel gets a NIC only when ports are forwarded to it or the
    egress proxy serves it. `egress` (egress.NetworkPlan.netdev_extra): None for no NIC at all
    (network mode "none"), else the netdev options of the mode (allowlist: restrict=on, guestfwd)."""
    if egress is None:
        return None
    if builtin_guest:
        return GuestNetwork(NetMode.USER, tuple(forwards), restrict=tuple(egress))
    if forwards or egress:
        return GuestNetwork(NetMode.USER, tuple(forwards), configure_guest=False, restrict=tuple(egress))
    return None
