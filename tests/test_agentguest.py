"""The agent guest (agentguest.py, guest/agent/): built for real from Debian's and npm's packages,
booted for real under QEMU (TCG here), the agent's CLI run in it.

Building a flavor takes minutes (tests/README in docs/agent-guest.md has the figures): the claude
guest is built once per session into the test cache; gemini and codex are opt-in
(AGENTVM_TEST_AGENT_FLAVORS=claude,gemini,codex) because three builds do not fit CI's budget.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from supervisor import agentguest, guest
from supervisor.config import Agent
from supervisor.errors import ExitCode
from tests import fake_anthropic
from tests.support import (
    TEST_CACHE,
    base_env,
    leftovers,
    run_supervisor,
    supervisor_argv,
    user_ids,
    wait_until_gone,
)

FLAVORS_ENV = "AGENTVM_TEST_AGENT_FLAVORS"
CACHE_ENV = {"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE)}
BUILD_TIMEOUT = 1800.0
BOOT_TIMEOUT = 600.0  # TCG on a shared 2-core machine: the claude binary alone is 245 MB to page in


def _flavors() -> list[str]:
    return [f for f in os.environ.get(FLAVORS_ENV, "claude").split(",") if f]


def _cache_env() -> dict[str, str]:
    return {**os.environ, **CACHE_ENV}


@pytest.fixture(scope="session")
def claude_guest(guest_assets: guest.GuestAssets) -> agentguest.AgentGuest:
    """The claude guest in the world-readable test cache (built on first use, as `run` does)."""
    return agentguest.ensure(_cache_env(), Agent.CLAUDE)


def _run_args(tmp: Path, name: str, flavor: str = "claude") -> list[str]:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return [
        "run", "--agent", flavor, "--name", name,
        "--work-dir", str(work), "--agent-home", str(tmp / "home"), "--runtime-dir", str(tmp / "rt"),
    ]  # fmt: skip


def _assert_nothing_left(name: str, runtime: Path) -> None:
    assert wait_until_gone(name) == []
    assert leftovers(runtime, timeout=10) == []


# ---- bad input: no VM, no (complete) build ----------------------------------------------------


def test_unknown_flavor_is_one_paragraph_and_builds_nothing(tmp_path: Path) -> None:
    result = run_supervisor(
        ["guest", "build", "--agent", "copilot"], env={"AGENTVM_SUPERVISE_CACHE": str(tmp_path)}
    )
    assert result.returncode == ExitCode.USAGE
    assert "unknown agent flavor 'copilot': use one of claude, gemini, codex" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_registry_is_named_with_the_remedy(tmp_path: Path) -> None:
    # a dead proxy: nothing listens on port 9 of the loopback
    env = {"AGENTVM_SUPERVISE_CACHE": str(tmp_path), "https_proxy": "http://127.0.0.1:9"}
    result = run_supervisor(["guest", "build", "--agent", "gemini"], env=env)
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    assert "cannot reach the npm registry to find @google/gemini-cli" in result.stderr
    assert "check the network or proxy" in result.stderr
    assert [p for p in tmp_path.iterdir() if p.name.startswith(("agent-", ".agent-claude"))] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="building an agent guest needs root")
def test_a_failed_debian_download_leaves_no_half_built_guest(guest_assets: guest.GuestAssets) -> None:
    # the registry works, the Debian mirror does not (a dead local port): mmdebstrap fails. An
    # older version than the newest, which another test may have built.
    env = {**CACHE_ENV, "AGENTVM_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}
    argv = ["guest", "build", "--agent", "codex", "--cli-version", "0.169.0"]
    result = run_supervisor(argv, env=env, timeout=600)
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    said = " ".join(result.stderr.split())  # the paragraph is folded at 100 columns
    assert "mmdebstrap could not build the Debian 13 root file system" in said
    assert "guest build --agent codex' again" in said
    assert sorted(p.name for p in TEST_CACHE.glob("*agent-codex-0.169.0-*")) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="building an agent guest needs root")
@pytest.mark.skipif("claude" not in _flavors(), reason=f"{FLAVORS_ENV} leaves claude out")
def test_a_cli_whose_native_binary_is_missing_fails_the_build(guest_assets: guest.GuestAssets) -> None:
    # npm runs no postinstall and leaves the per-platform optional dependency out (claude-code
    # #50609): the package installs, its stub cannot run. An older version than the session's
    # guest, so that there is something to build.
    env = {**CACHE_ENV, "npm_config_omit": "optional", "npm_config_ignore_scripts": "true"}
    argv = ["guest", "build", "--agent", "claude", "--cli-version", "2.1.330"]
    result = run_supervisor(argv, env=env, timeout=BUILD_TIMEOUT)
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    said = " ".join(result.stderr.split())  # the paragraph is folded at 100 columns
    assert "'claude --version' fails in the guest's root file system" in said
    assert "native binary is missing" in said
    left = list(TEST_CACHE.glob("*agent-claude-2.1.330-*"))
    for path in left:  # a guest that did build must not stay for the next run to find
        shutil.rmtree(path)
    assert left == []


def test_an_unprivileged_build_names_the_root_way(test_user: str, shared_tmp: Path) -> None:
    uid, gid = user_ids(test_user)
    os.chown(shared_tmp, uid, gid)
    env = {"AGENTVM_SUPERVISE_CACHE": str(shared_tmp / "cache")}
    result = run_supervisor(["guest", "build", "--agent", "codex"], env=env, user=test_user, cwd=shared_tmp)
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    assert "building it needs root" in result.stderr
    assert (
        f"sudo AGENTVM_SUPERVISE_CACHE={shared_tmp / 'cache'} agentvm-supervise guest build --agent codex"
        in (result.stderr.replace("\n", " "))
    )
    assert [
        p.name for p in (shared_tmp / "cache").iterdir() if p.name.startswith(("agent-", ".agent-codex"))
    ] == []


def test_a_full_disk_under_the_cache_is_one_paragraph_and_builds_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounts a small tmpfs as the cache")
    cache = tmp_path / "cache"
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(cache)], check=True)
    try:
        result = run_supervisor(
            ["guest", "build", "--agent", "claude"], env={"AGENTVM_SUPERVISE_CACHE": str(cache)}
        )
        assert result.returncode == ExitCode.CANT_CREATE, result.stderr
        assert f"the disk holding the guest cache {cache} has 64 MiB free" in result.stderr
        assert "Nothing was built." in result.stderr and "Traceback" not in result.stderr
        # no guest, half-built or not, nor the built-in guest's assets: only the build lock
        assert [p.name for p in cache.iterdir()] == [".agent-build.lock"]
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="building an agent guest needs root")
def test_a_build_that_cannot_mount_names_cap_sys_admin(guest_assets: guest.GuestAssets) -> None:
    # What an image build or a container without --cap-add SYS_ADMIN is: root without the
    # capability to mount the chroot's /proc. The build stops before mmdebstrap, naming the flag.
    argv = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--",
            *supervisor_argv(), "guest", "build", "--agent", "codex", "--cli-version", "0.169.0"]  # fmt: skip
    result = subprocess.run(
        argv, env=base_env(CACHE_ENV), capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    said = " ".join(result.stderr.split())  # the paragraph is folded at 100 columns
    assert "this process cannot mount" in said and "CAP_SYS_ADMIN is missing" in said
    assert "podman build --cap-add SYS_ADMIN" in said and "Traceback" not in said
    assert "[1/6]" not in said, "it stops before mmdebstrap downloads anything"
    assert sorted(p.name for p in TEST_CACHE.glob("*agent-codex-0.169.0-*")) == []


def test_a_flavor_missing_from_a_read_only_cache_is_named_without_a_build(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    """A container image's cache is read-only: `run --agent codex` with only a claude guest in it
    names what the cache has and the build argument that adds codex, and asks no network."""
    if os.geteuid() != 0:
        pytest.skip("mounts a read-only cache")
    cache = tmp_path / "cache"
    shutil.copytree(guest_assets.directory, cache / guest_assets.directory.name, symlinks=True)
    have = cache / f"agent-claude-2.0.0-{agentguest.sources_hash()}"
    have.mkdir(parents=True)
    for name in agentguest.FILES:
        (have / name).write_text("flavor=claude\ncli_version=2.0.0\n")
    subprocess.run(["mount", "--bind", "-o", "ro", str(cache), str(cache)], check=True)
    try:
        env = {"AGENTVM_SUPERVISE_CACHE": str(cache), "npm_config_registry": "http://127.0.0.1:9"}
        result = run_supervisor([*_run_args(tmp_path, "ro-cache", "codex"), "--", "true"], env=env)
    finally:
        subprocess.run(["umount", str(cache)], check=True)
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    said = " ".join(result.stderr.split())
    assert f"the codex agent guest is not built in {cache}, which is read-only" in said
    assert "that cache has claude" in said and '--build-arg AGENTS="claude codex"' in said
    assert "npm registry" not in said and "Traceback" not in said
    assert sorted(p.name for p in cache.iterdir()) == sorted([have.name, guest_assets.directory.name])


def test_a_cache_only_root_may_write_is_not_called_read_only(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    """A root-built cache an unprivileged user runs from is writable, just not by them: no
    "read-only" paragraph, the build path goes on (here to a dead registry, so nothing boots)."""
    cache = shared_tmp / "cache"
    cache.mkdir(mode=0o755)
    shutil.copytree(guest_assets.directory, cache / guest_assets.directory.name, symlinks=True)
    uid, gid = user_ids(test_user)
    for name in ("work", "home", "rt"):
        (shared_tmp / name).mkdir(mode=0o700)
        os.chown(shared_tmp / name, uid, gid)
    work = shared_tmp / "work"
    env = {"AGENTVM_SUPERVISE_CACHE": str(cache), "npm_config_registry": "http://127.0.0.1:9"}
    argv = ["run", "--agent", "codex", "--work-dir", str(work), "--agent-home", str(shared_tmp / "home"),
            "--runtime-dir", str(shared_tmp / "rt"), "--", "true"]  # fmt: skip
    result = run_supervisor(argv, env=env, user=test_user, cwd=shared_tmp)
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    assert "read-only" not in result.stderr
    assert "cannot reach the npm registry" in result.stderr


def test_doctor_reports_the_agent_guest(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    result = run_supervisor(
        ["doctor", "--json", "--agent", "gemini", "--work-dir", str(tmp_path / "work")],
        env={"AGENTVM_SUPERVISE_CACHE": str(tmp_path / "cache")},
    )
    assert '"name": "agent-guest"' in result.stdout
    assert "the gemini agent guest is not built yet" in result.stdout


# ---- the real guest ---------------------------------------------------------------------------


@pytest.mark.vm
def test_claude_version_inside_the_vm(claude_guest: agentguest.AgentGuest, tmp_path: Path) -> None:
    result = run_supervisor(
        [*_run_args(tmp_path, "ag-version"), "--", "claude", "--version"], timeout=BOOT_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    expected = claude_guest.versions()["cli_version"]
    assert f"{expected} (Claude Code)" in result.stdout
    _assert_nothing_left("ag-version", tmp_path / "rt")


@pytest.mark.vm
def test_a_shell_in_the_agent_guest_sees_the_contract(
    claude_guest: agentguest.AgentGuest, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    script = (
        'set -e; id -u > /work/uid; echo "$HOME $PWD" > /work/where; '
        "grep -E ' (/work|/home/agent|/var/lib/containers) ' /proc/mounts | cut -d' ' -f1,2 | sort > /work/mounts; "
        "ip -4 -o addr show | awk '{print $4}' | sort > /work/addr; "
        "grep -c '^overlay / overlay ' /proc/mounts > /work/root; "
        'echo "${HTTPS_PROXY:-none}" > /work/proxy; exit 5'
    )
    (home).mkdir()
    result = run_supervisor(
        [*_run_args(tmp_path, "ag-shell"), "--", "bash", "-c", script],
        env={"DIRENV_ALLOW": "0", "ANTHROPIC_API_KEY": "sk-test"},
        timeout=BOOT_TIMEOUT,
    )
    work = tmp_path / "work"
    assert result.returncode == 5, (result.stdout, result.stderr[-3000:])
    assert (work / "uid").read_text() == "1000\n"
    assert (work / "where").read_text() == "/home/agent /work\n"
    assert (work / "mounts").read_text().splitlines() == [
        "agent-home /home/agent",
        "cri-storage /var/lib/containers",
        "work /work",
    ]
    assert (work / "addr").read_text().splitlines() == ["10.0.2.15/24", "127.0.0.1/8"]
    assert (work / "root").read_text() == "1\n"
    # the agent guest's network is the egress allow-list by default: the proxy is the way out
    assert (work / "proxy").read_text().startswith("http://10.0.2.")
    info = (work / "uid").stat()
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    _assert_nothing_left("ag-shell", tmp_path / "rt")


@pytest.mark.vm
def test_enable_cri_podman_stores_in_the_cri_storage_share(
    claude_guest: agentguest.AgentGuest, tmp_path: Path
) -> None:
    script = 'podman info --format "{{.Store.GraphRoot}}" > /work/graphroot; docker info >/dev/null; echo $?'
    result = run_supervisor(
        [*_run_args(tmp_path, "ag-cri"), "--", "bash", "-c", script],
        env={"ENABLE_CRI": "podman"},
        timeout=BOOT_TIMEOUT,
    )
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    assert (tmp_path / "work" / "graphroot").read_text() == "/var/lib/containers/storage\n"
    assert (tmp_path / "home" / "cri-storage" / "storage").is_dir()  # on the host, in the share
    _assert_nothing_left("ag-cri", tmp_path / "rt")


def _tmux(socket: str, *args: str) -> str:
    result = subprocess.run(
        ["tmux", "-L", socket, "-f", "/dev/null", *args], capture_output=True, text=True, check=True
    )
    return result.stdout


def _wait_screen(socket: str, pattern: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = _tmux(socket, "capture-pane", "-p", "-J", "-t", "agent")
        if re.search(pattern, screen, re.MULTILINE):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not on the screen within {timeout} s:\n{screen}")
        time.sleep(0.5)


@pytest.mark.vm
def test_the_agent_ui_in_tmux_resizes_and_stops_from_the_console(
    claude_guest: agentguest.AgentGuest, tmp_path: Path
) -> None:
    key = "sk-ant-fake-0123456789abcdefghij"
    home = tmp_path / "home"
    home.mkdir()
    # claude's own first-run dialogs (theme, API key, folder trust) answered ahead, as a user would
    settings = {
        "hasCompletedOnboarding": True,
        "theme": "dark",
        "customApiKeyResponses": {"approved": [key[-20:]], "rejected": []},
        "projects": {"/work": {"hasTrustDialogAccepted": True, "allowedTools": []}},
    }
    (home / ".claude.json").write_text(json.dumps(settings))
    socket = f"agentvm-agent-tests-{os.getpid()}"
    argv = [*supervisor_argv(), *_run_args(tmp_path, "ag-tmux")]
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in base_env({"ANTHROPIC_API_KEY": key}).items())
    shell = f"env -i {env} {shlex.join(argv)} 2>{tmp_path}/stderr; echo EXIT=$?; stty -a | head -1; sleep 600"
    _tmux(socket, "new-session", "-d", "-s", "agent", "-x", "100", "-y", "30", shell)
    try:
        # its first screen: the banner, the cwd, the input box between two rules as wide as the pane
        screen = _wait_screen(socket, r"Claude Code v[0-9][\s\S]*^─{100}$", BOOT_TIMEOUT)
        assert "/work" in screen
        _tmux(socket, "resize-window", "-t", "agent", "-x", "70", "-y", "24")
        # the agent redraws its input box's rules at the new width: 70 columns
        _wait_screen(socket, r"^─{70}$", 120)
        _tmux(socket, "send-keys", "-t", "agent", "C-]")
        _tmux(socket, "send-keys", "-t", "agent", "-l", ".")
        screen = _wait_screen(socket, r"EXIT=\d+\s+speed .*columns \d+", 120)
        assert "EXIT=130" in screen  # stopped from the console
        assert "rows 24; columns 70" in screen  # the pane's terminal, given back
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)
    _assert_nothing_left("ag-tmux", tmp_path / "rt")


def _agent_turn(tmp_path: Path, name: str, *, user: str | None = None) -> None:
    script = fake_anthropic.Script(
        tool="Write",
        tool_input={"file_path": "/work/hello.txt", "content": "hello from the fake API\n"},
        final_text="I wrote /work/hello.txt.",
    )
    with fake_anthropic.serve(script) as port:
        command = fake_anthropic.claude_write_turn(f"http://10.0.2.2:{port}")
        # the fake API is on the host's loopback, which the default allow-list does not reach
        result = run_supervisor(
            [*_run_args(tmp_path, name), "--network", "open", "--", *command],
            env={"ANTHROPIC_API_KEY": "sk-ant-fake"},
            user=user,
            cwd=tmp_path,
            timeout=BOOT_TIMEOUT,
        )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert script.tool_calls >= 1, [r["path"] for r in script.requests]
    assert script.tool_results, "the CLI never sent the Write tool's result back"
    hello = tmp_path / "work" / "hello.txt"
    assert hello.read_text() == "hello from the fake API\n"
    owner = user_ids(user) if user else (os.getuid(), os.getgid())
    info = hello.stat()
    assert (info.st_uid, info.st_gid) == owner
    assert "I wrote /work/hello.txt." in result.stdout


@pytest.mark.vm
def test_a_full_agent_turn_writes_a_file_on_the_host(
    claude_guest: agentguest.AgentGuest, tmp_path: Path
) -> None:
    _agent_turn(tmp_path, "ag-turn")
    _assert_nothing_left("ag-turn", tmp_path / "rt")


@pytest.mark.vm
def test_a_full_agent_turn_as_an_unprivileged_user(
    claude_guest: agentguest.AgentGuest, test_user: str, shared_tmp: Path
) -> None:
    uid, gid = user_ids(test_user)
    os.chown(shared_tmp, uid, gid)
    (shared_tmp / "work").mkdir()
    os.chown(shared_tmp / "work", uid, gid)
    _agent_turn(shared_tmp, "ag-user-turn", user=test_user)
    _assert_nothing_left("ag-user-turn", shared_tmp / "rt")


@pytest.mark.vm
def test_egress_agent_turn(claude_guest: agentguest.AgentGuest, tmp_path: Path) -> None:
    """The agent guest's default network: the fake API reached only through the supervisor's proxy
    when its address is allowed; not allowed, the agent fails on the 403 and the log says why."""
    script = fake_anthropic.Script(
        tool="Write",
        tool_input={"file_path": "/work/hello.txt", "content": "through the proxy\n"},
        final_text="I wrote /work/hello.txt.",
    )
    # 127.0.0.2: not in the guest's NO_PROXY (localhost, 127.0.0.1), so claude goes through the proxy,
    # which refuses loopback addresses unless that exact address is allowed.
    with fake_anthropic.serve(script, host="127.0.0.2") as port:
        command = fake_anthropic.claude_write_turn(f"http://127.0.0.2:{port}")
        outcomes = {}
        requests_when_allowed = 0
        for case, allow in (("allowed", f'["127.0.0.2:{port}"]'), ("denied", "[]")):
            config = tmp_path / f"{case}.toml"
            config.write_text(f'[network]\nmode = "allowlist"\nallow = {allow}\n')
            outcomes[case] = run_supervisor(
                [*_run_args(tmp_path, f"ag-eg-{case[:2]}"), "--config", str(config), "--", *command],
                env={"ANTHROPIC_API_KEY": "sk-ant-fake"},
                cwd=tmp_path,
                timeout=BOOT_TIMEOUT,
            )
            if case == "allowed":
                requests_when_allowed = len(script.requests)
    allowed, denied = outcomes["allowed"], outcomes["denied"]
    assert allowed.returncode == 0, (allowed.stdout, allowed.stderr)
    assert (tmp_path / "work" / "hello.txt").read_text() == "through the proxy\n"
    assert denied.returncode != 0, (denied.stdout, denied.stderr)
    assert len(script.requests) == requests_when_allowed  # nothing reached the API when denied
    denials = [line for line in denied.stderr.splitlines() if '"egress denied"' in line]
    assert denials and '"host": "127.0.0.2"' in denials[0], denied.stderr
    _assert_nothing_left("ag-eg-al", tmp_path / "rt")
    _assert_nothing_left("ag-eg-de", tmp_path / "rt")


@pytest.mark.vm
@pytest.mark.parametrize("flavor", ["gemini", "codex"])
def test_other_flavors_build_and_report_their_version(
    flavor: str, guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    if flavor not in _flavors():
        pytest.skip(f"building the {flavor} guest takes minutes: opt in with {FLAVORS_ENV}=claude,{flavor}")
    built = agentguest.ensure(_cache_env(), Agent(flavor))
    result = run_supervisor(
        [*_run_args(tmp_path, f"ag-{flavor}", flavor), "--", flavor, "--version"], timeout=BOOT_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert built.versions()["cli_version"] in result.stdout


def test_guest_list_and_remove(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fake = cache / f"agent-codex-0.1.0-{agentguest.sources_hash()}"
    fake.mkdir(parents=True)
    for name in agentguest.FILES:
        (fake / name).write_text("flavor=codex\ncli_version=0.1.0\n" if name == "VERSIONS" else "x")
    env = {"AGENTVM_SUPERVISE_CACHE": str(cache)}
    listed = run_supervisor(["guest", "list"], env=env)
    assert listed.returncode == 0 and "codex: " in listed.stdout and "0.1.0" in listed.stdout
    removed = run_supervisor(["guest", "remove", "--agent", "codex"], env=env)
    assert removed.returncode == 0 and f"removed {fake}" in removed.stdout
    assert not fake.exists()


def test_guest_prune_keeps_only_what_a_run_would_pick(tmp_path: Path) -> None:
    """What the Containerfile's agent step runs after `guest build`: older CLI versions and builds
    of older scripts go, the newest current build of each flavor stays."""
    cache = tmp_path / "cache"
    current = agentguest.sources_hash()

    def fake(flavor: str, version: str, sources: str, age: int) -> Path:
        directory = cache / f"agent-{flavor}-{version}-{sources}"
        directory.mkdir(parents=True)
        for name in agentguest.FILES:
            (directory / name).write_text(f"flavor={flavor}\ncli_version={version}\n")
        os.utime(directory, (time.time() - age, time.time() - age))
        return directory

    older = fake("codex", "0.1.0", current, age=200)
    newest = fake("codex", "0.2.0", current, age=100)
    old_scripts = fake("codex", "0.3.0", "000000000000", age=0)
    claude = fake("claude", "2.0.0", current, age=300)
    env = {"AGENTVM_SUPERVISE_CACHE": str(cache)}
    assert agentguest.find_built(env, Agent.CODEX) == agentguest.AgentGuest(newest)
    pruned = run_supervisor(["guest", "prune"], env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(line.split()[-1] for line in pruned.stdout.splitlines()) == sorted(
        [str(older), str(old_scripts)]
    )
    assert sorted(p.name for p in cache.glob("agent-*")) == sorted([newest.name, claude.name])
    again = run_supervisor(["guest", "prune"], env=env)
    assert again.returncode == 0 and again.stdout == "" and "no agent guest to prune" in again.stderr
