"""The CLI's smaller contracts (issue 11): the default config file, the JSON outputs and their
published schema, shell completion."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

from supervisor import outputs
from tests.support import REPO, run_supervisor


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


def test_the_published_schema_is_current() -> None:
    """docs/schema.json is `agentvm-supervise schema`; regenerate it when an output changes:
    .venv/bin/agentvm-supervise schema > docs/schema.json"""
    result = run_supervisor(["schema"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == outputs.render(outputs.schema())
    assert (REPO / "docs" / "schema.json").read_text() == result.stdout, "docs/schema.json is stale"
    schema = json.loads(result.stdout)
    assert set(schema["x-outputs"]) == {
        "status --json", "list --json", "stop --json", "doctor --json", "control request", "control response",
    }  # fmt: skip
    assert {"InstanceStatus", "InstanceList", "StopResult", "Report"} <= set(schema["$defs"])


def _complete(script: str, line: str) -> list[str]:
    """What bash offers for `line` (the cursor at its end), with the generated script loaded."""
    words = line.split(" ")
    program = (
        f"{script}\nCOMP_WORDS=({' '.join(shlex.quote(word) for word in words)}); COMP_CWORD={len(words) - 1}\n"
        '_agentvm_supervise; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True, check=True
    )
    return [word for word in result.stdout.splitlines() if word]


def test_bash_completion_offers_commands_flags_and_values() -> None:
    result = run_supervisor(["completion", "bash"])
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert _complete(script, "agentvm-supervise ") == [
        "run", "doctor", "attach", "status", "stop", "list", "guest", "allow", "schema", "completion", "-h", "--help",
        "--version",
    ]  # fmt: skip
    assert _complete(script, "agentvm-supervise st") == ["status", "stop"]
    assert _complete(script, "agentvm-supervise run --acc") == ["--accel"]
    assert _complete(script, "agentvm-supervise run --accel ") == ["auto", "kvm", "tcg"]
    assert _complete(script, "agentvm-supervise doctor --work-dir /tmp --machine m") == ["microvm"]
    assert _complete(script, "agentvm-supervise stop --j") == ["--json"]
    assert _complete(script, "agentvm-supervise run -- make --acc") == []  # the guest's argv: filenames
    assert "complete -o default -F _agentvm_supervise agentvm-supervise" in script


def test_allow_and_deny_flags_add_to_the_files_rules(tmp_path: Path) -> None:
    """`--allow`/`--deny` add to [network] allow/deny (a Job adds a host without replacing the
    image's config); a bad rule from a flag is named like one from the file."""
    config = tmp_path / "net.toml"
    config.write_text('[network]\nmode = "allowlist"\nallow = ["a.example"]\npresets = []\n')

    def egress(*flags: str) -> dict[str, Any]:
        row: dict[str, Any] = _doctor(tmp_path, "--config", str(config), *flags, env={})["egress"]
        return row

    assert "(1 allow rules, 0 deny rules)" in egress()["summary"]
    added = egress("--allow", "b.example:443", "--allow", "*.c.example", "--deny", "a.example")
    assert "(3 allow rules, 1 deny rules)" in added["summary"]
    bad = run_supervisor(["doctor", "--config", str(config), "--allow", "bad.example:99999"], env={})
    assert bad.returncode == 64
    assert "allow[1] 'bad.example:99999': the port must be a number from 1 to 65535" in " ".join(
        bad.stdout.split()
    )
