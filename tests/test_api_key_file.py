"""The API key from a file (`ANTHROPIC_API_KEY_FILE` etc.): how a Kubernetes Secret or a Podman
secret reaches the guest without ever being in the container's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor import launcher
from supervisor.config import Agent
from supervisor.errors import ExitCode, SupervisorError

SECRET = "sk-ant-TEST-from-a-file"  # noqa: S105 (a test value)


def _entries(tmp_path: Path, env: dict[str, str], agent: Agent = Agent.CLAUDE) -> dict[str, str]:
    home = tmp_path / "agent-home"
    home.mkdir(exist_ok=True)
    planned = launcher.plan_env_file(home, env, agent, None)
    launcher.write_env_file(planned)
    return dict(planned.entries)


@pytest.mark.parametrize("content", [SECRET, SECRET + "\n", SECRET + "\r\n"])
def test_key_file_reaches_the_env_file_without_its_line_break(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(content)  # `kubectl create secret --from-file` keeps a trailing newline
    entries = _entries(tmp_path, {"ANTHROPIC_API_KEY_FILE": str(key_file)})
    assert entries["ANTHROPIC_API_KEY"] == SECRET
    assert f"ANTHROPIC_API_KEY='{SECRET}'\n" in (tmp_path / "agent-home" / ".microvm-env").read_text()


def test_the_flavor_reads_its_own_key_file(tmp_path: Path) -> None:
    (tmp_path / "gemini").write_text("g-key\n")
    (tmp_path / "anthropic").write_text("a-key\n")
    env = {
        "GEMINI_API_KEY_FILE": str(tmp_path / "gemini"),
        "ANTHROPIC_API_KEY_FILE": str(tmp_path / "anthropic"),
    }
    entries = _entries(tmp_path, env, Agent.GEMINI)
    assert entries["GEMINI_API_KEY"] == "g-key"
    assert "ANTHROPIC_API_KEY" not in entries


@pytest.mark.parametrize(
    ("setup", "needle", "code"),
    [
        ("missing", "cannot read the API key file", ExitCode.NO_INPUT),
        ("directory", "cannot read the API key file", ExitCode.NO_INPUT),
        ("both", "both ANTHROPIC_API_KEY and ANTHROPIC_API_KEY_FILE are set", ExitCode.USAGE),
        ("binary", "is not text", ExitCode.USAGE),
        ("huge", "is over 64 KiB", ExitCode.USAGE),
        ("two-lines", "ANTHROPIC_API_KEY contains a line break", ExitCode.USAGE),
    ],
)
def test_a_bad_key_file_is_one_clear_error_that_never_shows_the_key(
    tmp_path: Path, setup: str, needle: str, code: ExitCode
) -> None:
    key_file = tmp_path / "api-key"
    env = {"ANTHROPIC_API_KEY_FILE": str(key_file)}
    if setup == "directory":
        key_file.mkdir()
    elif setup == "both":
        key_file.write_text(SECRET)
        env["ANTHROPIC_API_KEY"] = SECRET
    elif setup == "binary":
        key_file.write_bytes(b"\xff\xfe" + SECRET.encode())
    elif setup == "huge":
        key_file.write_text(SECRET * 5000)
    elif setup == "two-lines":
        key_file.write_text(f"{SECRET}\nsecond line\n")
    with pytest.raises(SupervisorError) as caught:
        _entries(tmp_path, env)
    assert needle in caught.value.message
    assert caught.value.exit_code == code
    assert "TEST-from" not in caught.value.message
    assert not (tmp_path / "agent-home" / ".microvm-env").exists()
