"""Egress control: the guest's only way out is an HTTP proxy the supervisor serves (docs/egress.md).

Mechanism, with QEMU user networking: `restrict=on`, so libslirp routes no guest packet to the
outside (TCP gets a reset, UDP and so DNS get nothing), and one `guestfwd` at GUEST_PROXY whose
per-connection command (`cmd:`, handoff.py) hands the guest's connection to the supervisor over
the instance's egress.sock. The proxy (proxy.py) then judges each request by the policy
(rules.py) and logs it (audit.py).

Why `cmd:` and not a chardev guestfwd: a chardev guestfwd is ONE byte stream for QEMU's whole
life, shared by every guest connection to that address (libslirp's slirp_socket_recv hands the
host's bytes to the newest matching socket; a guest connection's end is never signalled to the
chardev, nor a host close to the guest). Measured: three guest connections arrived as one stream,
and the third never saw its end. `cmd:` needs QEMU's seccomp sandbox to allow spawn and setsid
(libslirp's fork_exec calls setsid in the child): `needs_spawn`, and qemu.sandbox_options.

This module owns what the plan and the QEMU command line need; nothing here does I/O but
`check_egress`, which probes the handoff command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from supervisor import checks, children
from supervisor.config import Agent, Network, NetworkMode
from supervisor.control import EgressInfo
from supervisor.egress import audit
from supervisor.egress.proxy import Proxy
from supervisor.egress.rules import Policy, RuleError, build_policy
from supervisor.errors import ExitCode, SupervisorError
from supervisor.runtime import InstanceDir

GUEST_PROXY_ADDRESS = "10.0.2.100"  # inside QEMU's 10.0.2.0/24, clear of .2 (host), .3 (DNS), .15 (guest)
GUEST_PROXY_PORT = 3128
HANDOFF = Path(__file__).with_name("handoff.py")
HANDOFF_BINARY = Path(__file__).with_name("agentvm-handoff")  # handoff.c, built by setup.py when it can
_UNSAFE_IN_CMD = (" ", ",", "\t", "\n")  # fork_exec splits on spaces; QEMU's option parser on commas


@dataclass(frozen=True, kw_only=True)
class NetworkPlan:
    mode: NetworkMode
    why: str  # how the mode was chosen, for the log and status
    policy: Policy | None = None
    socket_path: Path | None = None
    log_path: Path | None = None
    handoff_argv: tuple[str, ...] = ()

    @classmethod
    def legacy(cls) -> NetworkPlan:
        """For a plan made without a network section: user-mode NAT."""
        return cls(mode=NetworkMode.OPEN, why="the default")

    @property
    def proxy_url(self) -> str:
        return f"http://{GUEST_PROXY_ADDRESS}:{GUEST_PROXY_PORT}"

    def guest_env(self) -> dict[str, str]:
        """What the guest's programs need to find the proxy (both spellings: curl reads lower case)."""
        if self.mode is not NetworkMode.ALLOWLIST:
            return {}
        url = self.proxy_url
        no_proxy = "localhost,127.0.0.1,::1"
        return {
            "HTTP_PROXY": url,
            "HTTPS_PROXY": url,
            "http_proxy": url,
            "https_proxy": url,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }

    @property
    def needs_spawn(self) -> bool:
        """QEMU must be allowed to fork/exec (the per-connection handoff): qemu.sandbox_options."""
        return self.mode is NetworkMode.ALLOWLIST

    def guest_cmdline(self) -> str:
        """The built-in guest's kernel parameter: its init exports the proxy variables."""
        return f"agentvm.proxy={self.proxy_url}" if self.mode is NetworkMode.ALLOWLIST else ""

    def netdev_extra(self) -> list[str] | None:
        """For network.plan_network: None for no NIC (mode none), else the extra -netdev user options."""
        if self.mode is NetworkMode.NONE:
            return None
        if self.mode in (NetworkMode.OPEN, NetworkMode.TAP):  # tap: network.plan_network's own NIC
            return []
        command = " ".join(self.handoff_argv)
        return ["restrict=on", f"guestfwd=tcp:{GUEST_PROXY_ADDRESS}:{GUEST_PROXY_PORT}-cmd:{command}"]


def make_proxy(network: NetworkPlan) -> Proxy | None:
    """The instance's proxy (allowlist mode), its audit log opened; serve it with serve_handoff."""
    if network.policy is None:
        return None
    return Proxy(network.policy, audit.Audit(network.log_path))


def egress_info(proxy: Proxy, network: NetworkPlan) -> EgressInfo:
    """The counts `status` shows."""
    stats = proxy.audit.stats
    return EgressInfo(
        mode=network.mode.value,
        proxy=network.proxy_url,
        log=str(network.log_path) if network.log_path else None,
        connections=stats.connections,
        active=stats.active,
        allowed=stats.allowed,
        denied=stats.denied,
        errors=stats.errors,
        busy=stats.busy,
        bytes_up=stats.bytes_up,
        bytes_down=stats.bytes_down,
        top_denied=[f"{host} ({count})" for host, count in stats.denied_hosts.most_common(5)],
    )


def handoff_argv(socket_path: Path, *, binary: bool | None = None) -> tuple[str, ...]:
    """The C helper when it was built (about 1 ms to start), else handoff.py (20-100 ms);
    `binary` True or False picks one."""
    if binary if binary is not None else os.access(HANDOFF_BINARY, os.X_OK):
        return (str(HANDOFF_BINARY), str(socket_path))
    # -I: ignore the environment and user site; -S: no site import (fast start, stdlib only)
    return (sys.executable, "-I", "-S", str(HANDOFF), str(socket_path))


def plan_network(
    config: Network,
    *,
    agent: Agent,
    agent_guest: bool,
    runner: bool,
    instance: str,
    instance_dir: Path,
    forwards: int,
    env: Mapping[str, str],
) -> NetworkPlan:
    """Choose the mode, build the policy (every bad rule is an error naming it), place the files."""
    if config.mode is not None:
        mode, why = config.mode, "network.mode (or --network)"
    elif agent_guest:
        mode, why = NetworkMode.ALLOWLIST, "the default for agent guests"
    else:
        mode, why = NetworkMode.OPEN, "the default for the built-in shell guest"
    if runner and mode is NetworkMode.NONE:
        raise SupervisorError(
            'network.mode = "none" is not supported for microvm.nix runners (their network devices '
            'are not removed): use "allowlist", or remove microvm.interfaces from the VM'
        )
    if mode is NetworkMode.NONE and forwards:
        raise SupervisorError(
            'network.mode = "none" gives the guest no network device, so --forward / forwards have '
            'nothing to forward to: drop the forwards, or use mode "allowlist" (forwards still work)'
        )
    if mode is not NetworkMode.ALLOWLIST:
        return NetworkPlan(mode=mode, why=why)
    try:
        policy = build_policy(allow=config.allow, deny=config.deny, presets=config.presets, agent=agent)
    except RuleError as exc:
        raise SupervisorError(
            f'network: {exc}. Rules look like "example.com", "*.example.com:443", "10.1.2.3" or '
            '"[::1]:8080" (see docs/egress.md)'
        ) from None
    socket_path = InstanceDir(instance_dir).egress_socket
    return NetworkPlan(
        mode=mode,
        why=why,
        policy=policy,
        socket_path=socket_path,
        log_path=audit.default_dir(dict(env)) / f"{instance}.jsonl",
        handoff_argv=handoff_argv(socket_path),
    )


def check_egress(network: NetworkPlan) -> checks.Check:
    """doctor/preflight: the handoff command can run, and its words survive QEMU's parsing."""
    if network.mode is not NetworkMode.ALLOWLIST:
        return checks.skip("egress", f'network mode "{network.mode.value}" needs no egress proxy')
    facts: dict[str, checks.Fact] = {"mode": network.mode.value, "proxy": network.proxy_url}
    bad = [word for word in network.handoff_argv if any(char in word for char in _UNSAFE_IN_CMD)]
    if bad:
        return checks.fail(
            "egress",
            f"the egress handoff command has a path with a space or comma ({bad[0]}), which QEMU's "
            "guestfwd cannot carry",
            "install agentvm-supervise and put the runtime dir (runtime-dir) under paths without "
            "spaces or commas",
            facts,
        )
    helper = network.handoff_argv[0]
    facts["handoff"] = helper
    if helper == str(HANDOFF_BINARY):
        result = children.probe([helper])
        if result.status != 2:  # its usage error: it runs
            return checks.fail(
                "egress",
                f"the egress handoff helper {helper} does not run ({result.error or result.output.strip()})",
                "rebuild it: ./install.sh (or remove it: handoff.py then takes its place)",
                facts,
            )
    else:
        result = children.probe([helper, "-I", "-S", "-c", "import socket; socket.send_fds"])
        if result.status != 0 or not HANDOFF.is_file():
            return checks.fail(
                "egress",
                f"the egress handoff's Python ({helper}) cannot run {HANDOFF} (or lacks socket.send_fds)",
                "reinstall agentvm-supervise (./install.sh) so its Python 3.11+ and files are in place",
                facts,
            )
        return checks.warn(
            "egress",
            f"allowlist: the proxy at {network.proxy_url} works, but each guest connection starts "
            "Python's handoff.py (20-100 ms) because the C helper was not built",
            "install gcc and libc6-dev, then run ./install.sh again (it builds egress/agentvm-handoff)",
            facts,
        )
    policy = network.policy
    return checks.ok(
        "egress",
        f"allowlist: the guest's only way out is the proxy at {network.proxy_url} "
        f"({len(policy.allow) if policy else 0} allow rules, {len(policy.deny) if policy else 0} deny rules)",
        facts,
    )


__all__ = [
    "ExitCode",
    "NetworkPlan",
    "check_egress",
    "egress_info",
    "handoff_argv",
    "make_proxy",
    "plan_network",
]
