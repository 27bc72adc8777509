"""The CLI's smaller contracts (issue 11): the default config file, the JSON outputs and their
published schema, shell completion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support import run_supervisor


def _doctor(tmp_path: Path, *args: str, env: dict[str, str]) -> dict[str, Any]:
    (tmp_path / "work").mkdir(exist_ok=True)
    result = run_supervisor(
        [
            "doctor",
            "--json",
            "--work-dir",
            str(tmp_path / "work"),
            "--runtime-dir",
            str(tmp_path / "rt"),
            *args,
        ],
        env=env,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return {check["name"]: check for check in report["checks"]}


def test_the_default_config_file_is_read_unless_a_file_or_flag_says_otherwise(tmp_path: Path) -> None:
    config_home = tmp_path / "config"
    (config_home / "agentvm-supervise").mkdir(parents=True)
    (config_home / "agentvm-supervise" / "config.toml").write_text(
        '[qemu]\nbinary = "/nonexistent/qemu-from-default"\n'
    )
    env = {"XDG_CONFIG_HOME": str(config_home)}
    assert "qemu-from-default" in _doctor(tmp_path, env=env)["qemu"]["summary"]
    # --config replaces the default file; a flag beats both
    other = tmp_path / "other.toml"
    other.write_text('[qemu]\nbinary = "/nonexistent/qemu-from-other"\n')
    assert "qemu-from-other" in _doctor(tmp_path, "--config", str(other), env=env)["qemu"]["summary"]
    assert (
        "qemu-from-flag"
        in _doctor(tmp_path, "--qemu", "/nonexistent/qemu-from-flag", env=env)["qemu"]["summary"]
    )
    # a relative XDG_CONFIG_HOME is ignored (the XDG spec), so is a missing file
    assert (
        _doctor(tmp_path, env={"XDG_CONFIG_HOME": "config", "HOME": str(tmp_path)})["qemu"]["status"] == "ok"
    )
