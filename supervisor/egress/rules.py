"""The egress policy: which host:port the guest may reach through the proxy, and which rule says so.

A rule is `host`, `*.suffix` or an address, each with an optional `:port` (`[v6]:port` for IPv6).
`*.example.com` matches every name below example.com, not example.com itself. Deny rules are
checked first and win. IP literals and names that resolve to non-public addresses (loopback,
link-local and with it cloud metadata, private, CGNAT, reserved) are refused unless an allow rule
names that very address: a guest must not reach the host's own services or the LAN because some
allowed name happens to resolve there. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from supervisor.config import Agent, Preset

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")

# The development preset: what a coding agent needs to fetch code and packages. Each entry with why
# (docs/egress.md repeats the list for users).
DEVELOPMENT_PRESET: tuple[tuple[str, str], ...] = (
    ("github.com", "git clone/fetch over HTTPS, the web UI's API for gh"),
    ("api.github.com", "the GitHub API (gh, release downloads' redirects)"),
    ("codeload.github.com", "tarballs of repositories (npm/pip installs from GitHub)"),
    ("objects.githubusercontent.com", "release assets and LFS objects"),
    ("raw.githubusercontent.com", "raw files (install scripts, configs)"),
    ("registry.npmjs.org", "the npm registry (npm, pnpm, yarn)"),
    ("pypi.org", "the PyPI index (pip, uv, poetry)"),
    ("files.pythonhosted.org", "PyPI's package files"),
    ("crates.io", "the crates.io index API (cargo)"),
    ("index.crates.io", "cargo's sparse index"),
    ("static.crates.io", "crate downloads"),
    ("deb.debian.org", "Debian packages (apt)"),
    ("security.debian.org", "Debian security updates (apt)"),
)

# Each agent flavor's own hosts: its model API and the login it needs.
AGENT_HOSTS: dict[Agent, tuple[tuple[str, str], ...]] = {
    Agent.CLAUDE: (
        ("api.anthropic.com", "Claude Code's model API"),
        ("claude.ai", "account login (claude.ai subscription)"),
        ("platform.claude.com", "account login (Console / API accounts)"),
        ("console.anthropic.com", "account login (older Console address)"),
    ),
    Agent.GEMINI: (
        ("generativelanguage.googleapis.com", "the Gemini API (API key)"),
        ("cloudcode-pa.googleapis.com", "Gemini Code Assist (Google login)"),
        ("oauth2.googleapis.com", "Google login tokens"),
        ("accounts.google.com", "Google login"),
    ),
    Agent.CODEX: (
        ("api.openai.com", "the OpenAI API"),
        ("auth.openai.com", "ChatGPT login"),
        ("chatgpt.com", "ChatGPT-plan requests of the Codex CLI"),
    ),
}


class RuleError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    """One allow or deny entry; `origin` names it for the 403 and the log (e.g. `allow[2]`)."""

    host: str  # lower-case name, "*.suffix", or a normalized address
    port: int | None
    origin: str
    address: IpAddress | None = None

    @property
    def text(self) -> str:
        host = f"[{self.host}]" if self.address is not None and self.address.version == 6 else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def matches(self, host: str, port: int, address: IpAddress | None = None) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.address is not None:
            return address is not None and address == self.address
        if address is not None:  # names and wildcards never match an address
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host


def parse_address(text: str) -> IpAddress | None:
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_rule(text: str, origin: str) -> Rule:
    """`host`, `*.suffix`, `1.2.3.4`, `[::1]`, each with an optional `:port`."""
    raw = text.strip().lower()
    host, port_text = raw, ""
    if raw.startswith("["):
        end = raw.find("]")
        host, rest = raw[: end + 1], raw[end + 1 :]
        if end < 0 or (rest and not rest.startswith(":")):
            raise RuleError(f"{origin} '{text}': an IPv6 address is written [ADDR] or [ADDR]:PORT")
        port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    port: int | None = None
    if port_text or raw.endswith(":"):
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise RuleError(f"{origin} '{text}': the port must be a number from 1 to 65535")
        port = int(port_text)
    address = parse_address(host)
    if address is not None:
        return Rule(host=str(address), port=port, origin=origin, address=address)
    if raw.count(":") > 1 and not raw.startswith("["):
        raise RuleError(f"{origin} '{text}': write an IPv6 address in brackets, e.g. [2001:db8::1]:443")
    if not _NAME.match(host) or (host.startswith("*.") and "." not in host[2:]):
        raise RuleError(
            f"{origin} '{text}' is not a host name, a *.suffix wildcard (with at least two labels, "
            "e.g. *.example.com) or an IP address, optionally with :PORT"
        )
    return Rule(host=host, port=port, origin=origin)


def is_public(address: IpAddress) -> bool:
    """False for loopback, link-local (cloud metadata at 169.254.169.254), private, CGNAT, reserved,
    multicast, unspecified: what a guest must not reach through the host by default."""
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    rule: str  # the rule's origin and text, or a reason keyword ("not-allowed", "ip-literal", ...)
    reason: str = ""  # for a denial: what the 403 says, with how to allow it


@dataclass(frozen=True)
class Policy:
    allow: tuple[Rule, ...]
    deny: tuple[Rule, ...]

    def _hint(self, host: str, port: int) -> str:
        return (
            f'to allow it, add "{host}" (any port) or "{host}:{port}" to allow = [...] in the [network] '
            "section of the config (or remove the deny rule)"
        )

    def decide(self, host: str, port: int) -> Verdict:
        """The verdict on a name or address before resolution."""
        host = host.lower().rstrip(".")
        address = parse_address(host)
        for rule in self.deny:
            if rule.matches(host, port, address) or (address is None and rule.matches(host, port)):
                return Verdict(False, f"{rule.origin} {rule.text}", f"denied by {rule.origin} '{rule.text}'")
        if address is not None:
            for rule in self.allow:
                if rule.matches(host, port, address):
                    return Verdict(True, f"{rule.origin} {rule.text}")
            shown = f"[{address}]" if address.version == 6 else str(address)
            return Verdict(
                False,
                "ip-literal",
                f"{shown} is an IP address; only host names are allowed (so the rules and the TLS "
                f'server-name check mean something), unless allow = [...] lists "{shown}" itself',
            )
        for rule in self.allow:
            if rule.matches(host, port):
                return Verdict(True, f"{rule.origin} {rule.text}")
        return Verdict(
            False, "not-allowed", f"{host}:{port} is not on the allow-list; {self._hint(host, port)}"
        )

    def address_allowed(self, address: IpAddress, port: int) -> bool:
        """A resolved address: public ones pass; others only when an allow rule names them."""
        if any(rule.matches(str(address), port, address) for rule in self.deny):
            return False
        if is_public(address):
            return True
        return any(rule.matches(str(address), port, address) for rule in self.allow)


def build_policy(
    *, allow: Sequence[str], deny: Sequence[str], presets: Iterable[Preset], agent: Agent
) -> Policy:
    rules: list[Rule] = []
    for preset in presets:
        agent_preset = preset is Preset.AGENT
        entries = AGENT_HOSTS[agent] if agent_preset else DEVELOPMENT_PRESET
        name = f"preset {agent.value}" if agent_preset else "preset development"
        rules += [parse_rule(host, name) for host, _why in entries]
    rules += [parse_rule(text, f"allow[{index}]") for index, text in enumerate(allow)]
    denies = [parse_rule(text, f"deny[{index}]") for index, text in enumerate(deny)]
    return Policy(allow=tuple(rules), deny=tuple(denies))
