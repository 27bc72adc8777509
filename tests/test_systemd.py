"""systemd/: the user template passes `systemd-analyze verify` and keeps the stop-path invariants.

systemd is installed on the test machines but is not their init; `systemd-analyze --user verify`
works offline once XDG_RUNTIME_DIR names a private dir.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from supervisor import config
from tests.support import REPO

TEMPLATE = REPO / "systemd" / "agentvm@.service"
ENTRY_POINT = REPO / ".venv" / "bin" / "agentvm-supervise"


def _verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "XDG_RUNTIME_DIR": str(runtime),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        ["systemd-analyze", "--user", "verify", str(unit)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


SHIPPED_EXEC = "ExecStart=%h/.local/bin/agentvm-supervise "


def _instance(tmp_path: Path, text: str, name: str = "agentvm@demo.service") -> Path:
    # The shipped ExecStart names ~/.local/bin/agentvm-supervise (pipx's place, and install.sh's
    # link for a user); here it names this checkout's entry point so verify can find it.
    unit = tmp_path / name
    unit.write_text(text.replace(SHIPPED_EXEC, f"ExecStart={ENTRY_POINT} "))
    return unit


def test_user_template_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = TEMPLATE.read_text()
    # Regression (issue 11): a bare `agentvm-supervise` is looked up only in systemd's fixed path.
    assert f"{SHIPPED_EXEC}run --config %E/agentvm/%i.toml\n" in text
    result = _verify(_instance(tmp_path, text), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # not even a warning


def _service(text: str) -> dict[str, list[str]]:
    """[Service] keys with every value (DeviceAllow= and friends repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


# What a VM supervisor can live with (issue 11), and what would break it.
HARDENING = {
    "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "ProtectSystem": "strict", "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes", "DevicePolicy": "closed", "LockPersonality": "yes",
    "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native", "UMask": "0077",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
}  # fmt: skip
BREAKS_THE_VM = ("RestrictNamespaces", "MemoryDenyWriteExecute", "PrivateDevices", "PrivateNetwork")


def test_template_is_sandboxed_without_what_breaks_a_vm(tmp_path: Path) -> None:
    service = _service(TEMPLATE.read_text())
    assert {key: service.get(key, [None])[-1] for key in HARDENING} == HARDENING
    assert service["DeviceAllow"] == ["/dev/kvm rw", "/dev/ptmx rw", "char-pts rw"]
    assert service["ReadWritePaths"] == ["%h %t"]
    assert not [key for key in BREAKS_THE_VM if key in service]
    unit = _instance(tmp_path, TEMPLATE.read_text())
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--user", str(unit)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(runtime)},
        check=False,
    )
    # "Overall exposure level for agentvm@demo.service: 3.2 OK"; main's unit (none of it) had 9.8.
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    assert match, security.stdout + security.stderr
    assert float(match.group(1)) < 5.0, security.stdout


def test_verify_catches_what_it_should(tmp_path: Path) -> None:
    text = TEMPLATE.read_text()
    typo = _verify(_instance(tmp_path, text.replace("KillMode=mixed", "KilMode=mixed")), tmp_path)
    assert "Unknown key 'KilMode'" in typo.stderr
    missing = _verify(_instance(tmp_path, text.replace(SHIPPED_EXEC, "ExecStart=/no/such ")), tmp_path)
    assert missing.returncode != 0 and "/no/such" in missing.stderr


def test_template_keeps_the_stop_path_invariants() -> None:
    text = TEMPLATE.read_text()
    service = {key: values[-1] for key, values in _service(text).items()}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    timeouts = config.Timeouts()
    whole_stop = timeouts.graceful_stop + timeouts.quit + 2 * timeouts.kill_grace
    assert float(service["TimeoutStopSec"]) > whole_stop
    assert service["Restart"] == "no"
    assert "\n[Install]\nWantedBy=default.target\n" in text
