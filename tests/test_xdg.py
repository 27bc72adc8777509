"""One XDG rule for every directory we derive (issue 11: four modules had four fallbacks); and the
guest command quoted by the standard library."""

from __future__ import annotations

import base64
import os
import pwd
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import devallow, facts, guest, launcher, plan, runtime, sshkeys, xdg
from supervisor.egress import audit

PASSWD_HOME = Path(pwd.getpwuid(os.geteuid()).pw_dir)


def _dirs(env: dict[str, str]) -> dict[str, Path]:
    """Every place that used to read XDG variables itself, as the code uses it."""
    return {
        "cache": guest.cache_root(env),
        "data": launcher.default_agent_home(Path("/w/proj"), env).parent.parent,
        "state": plan.default_console_log_dir(env).parent.parent,
        "config": (xdg.base("XDG_CONFIG_HOME", env)),
    }


def test_absolute_variables_are_used() -> None:
    env = {
        "HOME": "/h",
        "XDG_CACHE_HOME": "/c",
        "XDG_DATA_HOME": "/d",
        "XDG_STATE_HOME": "/s",
        "XDG_CONFIG_HOME": "/k",
    }
    assert _dirs(env) == {
        "cache": Path("/c/agentvm-supervise"), "data": Path("/d"), "state": Path("/s"), "config": Path("/k"),
    }  # fmt: skip


@pytest.mark.parametrize("value", ["", "relative/dir"])
def test_empty_or_relative_variables_fall_back_to_the_home_dir(value: str) -> None:
    """The spec: a relative path in these variables is invalid and ignored (it used to be taken
    relative to whatever the current directory was)."""
    env = {"HOME": "/h", "XDG_CACHE_HOME": value, "XDG_DATA_HOME": value, "XDG_STATE_HOME": value,
           "XDG_CONFIG_HOME": value, "XDG_RUNTIME_DIR": value}  # fmt: skip
    assert _dirs(env) == {
        "cache": Path("/h/.cache/agentvm-supervise"), "data": Path("/h/.local/share"),
        "state": Path("/h/.local/state"), "config": Path("/h/.config"),
    }  # fmt: skip
    assert runtime.default_base(env, 1234) == Path("/tmp/agentvm-1234")


def test_without_home_every_dir_is_under_the_users_passwd_home() -> None:
    """Without HOME the cache and the console logs went to /root, the agent home to the passwd home."""
    assert _dirs({}) == {
        "cache": PASSWD_HOME / ".cache/agentvm-supervise", "data": PASSWD_HOME / ".local/share",
        "state": PASSWD_HOME / ".local/state", "config": PASSWD_HOME / ".config",
    }  # fmt: skip


def test_runtime_dir_must_exist(tmp_path: Path) -> None:
    assert runtime.default_base({"XDG_RUNTIME_DIR": str(tmp_path)}, 1) == tmp_path / "agentvm"
    assert runtime.default_base({"XDG_RUNTIME_DIR": str(tmp_path / "gone")}, 1) == Path("/tmp/agentvm-1")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=12),
        min_size=1,
        max_size=5,
    )
)
def test_the_guest_command_survives_sh_c(argv: list[str]) -> None:
    """guest_cmdline quotes with shlex.join (issue 11: it had its own shell_join); a POSIX sh
    running the decoded command with `sh -c`, as the guest's /init does, sees the same argv."""
    cmdline = guest.guest_cmdline(
        mounts=[], command=["printf", "%s\\0", *argv], guest_uid=1000, guest_gid=1000, term=None
    )
    [encoded] = [part.split("=", 1)[1] for part in cmdline.split() if part.startswith("agentvm.cmd=")]
    script = base64.b64decode(encoded).decode()
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True).stdout
    assert out.decode().split("\0")[:-1] == argv


@pytest.mark.parametrize(
    "env", [{"HOME": "/h", "XDG_STATE_HOME": "relative/dir"}, {"XDG_STATE_HOME": "/s"}, {}], ids=str
)
def test_every_state_dir_follows_the_one_rule(env: dict[str, str]) -> None:
    """The facts cache, the dev-shell approvals, the egress log and the VMs' SSH host keys read
    XDG_STATE_HOME themselves until this test: a relative value was taken as is, and without HOME
    they went to /root."""
    state = xdg.base("XDG_STATE_HOME", env) / xdg.APP
    assert facts.facts_dir(env) == state / "facts"
    assert devallow.store_dir(env) == state / "devshell-allowed"
    assert audit.default_dir(dict(env)) == state / "egress"
    assert sshkeys.default_dir(env, "vm") == state / "vms" / "vm" / "ssh-host-keys"


def test_only_xdg_py_reads_the_xdg_variables() -> None:
    """One place for the rule: any other module that reads XDG_*_HOME itself is flagged here."""
    supervisor = Path(xdg.__file__).parent
    readers = [
        str(path.relative_to(supervisor))
        for path in sorted(supervisor.rglob("*.py"))
        if path.name != "xdg.py"
        and any(f'get("XDG_{kind}_HOME"' in path.read_text() for kind in ("CACHE", "DATA", "STATE", "CONFIG"))
    ]
    assert readers == []
