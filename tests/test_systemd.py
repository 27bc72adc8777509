"""systemd/: the user template passes `systemd-analyze verify` and keeps the stop-path invariants.

systemd is installed on the test machines but is not their init; `systemd-analyze --user verify`
works offline once XDG_RUNTIME_DIR names a private dir.
"""

from __future__ import annotations

import configparser
import os
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


def _instance(tmp_path: Path, text: str, name: str = "agentvm@demo.service") -> Path:
    # The shipped ExecStart names agentvm-supervise on systemd's search path (/usr/local/bin, where
    # install.sh links it as root); here it names this checkout's entry point so verify can find it.
    unit = tmp_path / name
    unit.write_text(text.replace("ExecStart=agentvm-supervise ", f"ExecStart={ENTRY_POINT} "))
    return unit


def test_user_template_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = TEMPLATE.read_text()
    assert "ExecStart=agentvm-supervise run --config %E/agentvm/%i.toml\n" in text
    result = _verify(_instance(tmp_path, text), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # not even a warning


def test_verify_catches_what_it_should(tmp_path: Path) -> None:
    text = TEMPLATE.read_text()
    typo = _verify(_instance(tmp_path, text.replace("KillMode=mixed", "KilMode=mixed")), tmp_path)
    assert "Unknown key 'KilMode'" in typo.stderr
    missing = _verify(
        _instance(tmp_path, text.replace("ExecStart=agentvm-supervise", "ExecStart=/no/such")), tmp_path
    )
    assert missing.returncode != 0 and "/no/such" in missing.stderr


def test_template_keeps_the_stop_path_invariants() -> None:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(TEMPLATE.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    timeouts = config.Timeouts()
    whole_stop = timeouts.graceful_stop + timeouts.quit + 2 * timeouts.kill_grace
    assert float(service["TimeoutStopSec"]) > whole_stop
    assert service["Restart"] == "no"
    assert parser["Install"]["WantedBy"] == "default.target"
