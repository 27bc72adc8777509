"""The claude-microvm launcher contract: paths, names, .microvm-env, the dev-shell cache, secrets."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from supervisor import children, config, guest, kvm, launcher, network, plan
from supervisor.config import Agent
from supervisor.errors import SupervisorError
from supervisor.qemu import QemuSpec, qemu_argv
from tests.support import (
    TEST_CACHE,
    Launch,
    children_of,
    instance_processes,
    leftovers,
    run_supervisor,
    wait_until_gone,
)

NO_KVM = kvm.KvmAssessment(False, "the test says so", "none")
SECRET = "sk-ant-TEST-'quoted' $HOME \\back `tick` \"dq\""  # noqa: S105 - a test value


def _seed_shell_home(work: Path, data_home: Path, agent: str = "claude") -> str:
    """claude-microvm's own derivation, as its launcher computes it in bash."""
    script = (
        'WORK="$(realpath "$1")"; '
        'B="$(basename "$WORK" | tr -cd \'a-zA-Z0-9_-\' | head -c 12)"; '
        '[ -z "$B" ] && B=root; '
        'H="$(echo -n "$WORK" | sha256sum | cut -c1-12)"; '
        'echo -n "$2/$3-microvm/$B-$H"'
    )
    return subprocess.run(
        ["bash", "-c", script, "seed", str(work), str(data_home), agent],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ["PATH"], "LC_ALL": "C.UTF-8"},
    ).stdout


@pytest.mark.parametrize(
    "name",
    [
        "myproject",
        "my project with spaces",
        "Ünïcödé-prøjéct",
        "日本語のプロジェクト",
        "a-very-long-project-directory-name-indeed",
        "-dash_start.and.dots",
        "$(touch pwned)",
        "ÄÖÜ",
    ],
)
def test_agent_home_derivation_matches_the_seed_launcher(tmp_path: Path, name: str) -> None:
    work = tmp_path / name
    work.mkdir()
    data = tmp_path / "data"
    expected = _seed_shell_home(work, data)
    assert str(launcher.default_agent_home(work.resolve(), {"XDG_DATA_HOME": str(data)})) == expected
    assert not (tmp_path / "pwned").exists()
    basename = launcher.project_basename(work)
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,12}", basename)


def test_root_dir_and_unsanitisable_names_become_root(tmp_path: Path) -> None:
    assert launcher.project_basename(Path("/")) == "root"
    assert launcher.project_basename(tmp_path / "ÄÖÜ") == "root"


def test_symlinked_work_dir_uses_the_target_like_realpath(tmp_path: Path) -> None:
    target = tmp_path / "real-project"
    target.mkdir()
    link = tmp_path / "link-name"
    link.symlink_to(target)
    data = tmp_path / "data"
    checked = _plan(tmp_path, env={"WORK_DIR": str(link), "XDG_DATA_HOME": str(data)})
    assert checked.work_dir == target
    assert str(checked.agent_home) == _seed_shell_home(link, data)
    assert checked.instance.startswith("real-project-claude-vm-")


def test_data_home_defaults_to_home_local_share(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    home = launcher.default_agent_home(work, {"HOME": str(tmp_path / "h")}, Agent.CODEX)
    assert home.parent == tmp_path / "h" / ".local" / "share" / "codex-microvm"


def _plan(
    tmp_path: Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> plan.Plan:
    full_env = {"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE), "HOME": str(tmp_path / "home"), **(env or {})}
    merged = {"runtime-dir": "/tmp/avr-plan-only", **(overrides or {})}  # never created: plans only
    return plan.build_plan(
        config.load(None, merged),
        env=full_env,
        cwd=cwd or tmp_path,
        command=None,
        kvm_assessment=NO_KVM,
    )


def test_precedence_flag_then_config_then_env_then_cwd(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    for name in ("flag", "file", "env", "cwd"):
        (tmp_path / name).mkdir()
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'work-dir = "{tmp_path / "file"}"\nagent-home = "{tmp_path / "home-file"}"\n')
    env = {"WORK_DIR": str(tmp_path / "env"), "AGENT_HOME": "relative-home"}

    def build(path: Path | None, overrides: dict[str, Any]) -> plan.Plan:
        merged = {"runtime-dir": "/tmp/avr-plan-only", **overrides}
        return plan.build_plan(
            config.load(path, merged),
            env={"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE), **env},
            cwd=tmp_path / "cwd",
            command=None,
            kvm_assessment=NO_KVM,
        )

    flagged = build(cfg_file, {"work-dir": str(tmp_path / "flag"), "agent-home": str(tmp_path / "home-flag")})
    assert (flagged.work_dir, flagged.agent_home) == (tmp_path / "flag", tmp_path / "home-flag")
    from_file = build(cfg_file, {})
    assert (from_file.work_dir, from_file.agent_home) == (tmp_path / "file", tmp_path / "home-file")
    from_env = build(None, {})
    assert from_env.work_dir == tmp_path / "env"
    assert from_env.agent_home == tmp_path / "cwd" / "relative-home"  # relative to the caller's cwd
    env.clear()
    from_cwd = build(None, {})
    assert from_cwd.work_dir == tmp_path / "cwd"


def test_instance_names_are_per_agent_and_random(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    work = tmp_path / "My Project!"
    work.mkdir()
    first = _plan(tmp_path, {"work-dir": str(work)})
    second = _plan(tmp_path, {"work-dir": str(work)})
    gemini = _plan(tmp_path, {"work-dir": str(work), "agent": "gemini"})
    assert re.fullmatch(r"MyProject-claude-vm-[0-9a-f]{8}", first.instance)
    assert first.instance != second.instance
    assert first.agent_home == second.agent_home  # instances of one project share the agent home
    assert re.fullmatch(r"MyProject-gemini-vm-[0-9a-f]{8}", gemini.instance)
    assert gemini.agent_home is not None and gemini.agent_home.parent.name == "gemini-microvm"
    assert first.instance_dir.parent == Path("/tmp/avr-plan-only")
    named = _plan(tmp_path, {"work-dir": str(work), "name": "custom"})
    assert re.fullmatch(r"custom-[0-9a-f]{8}", named.instance)


# ---- .microvm-env ------------------------------------------------------------------------------


def _env_file(tmp_path: Path, env: Mapping[str, str], agent: Agent = Agent.CLAUDE) -> launcher.EnvFile:
    home = tmp_path / "agent-home"
    home.mkdir(exist_ok=True)
    return launcher.plan_env_file(home, env, agent, None)


def _source(path: Path, shell: str, names: list[str]) -> list[str]:
    printer = "; ".join(f'printf "%s\\0" "${{{name}-UNSET}}"' for name in names)
    result = subprocess.run(
        [shell, "-c", f". {path}; {printer}"], capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"}
    )
    return result.stdout.decode().split("\0")[:-1]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_env_file_is_0600_and_sources_back_exactly(tmp_path: Path, shell: str) -> None:
    planned = _env_file(
        tmp_path, {"DIRENV_ALLOW": "1", "ENABLE_CRI": "docker, podman", "ANTHROPIC_API_KEY": SECRET}
    )
    launcher.write_env_file(planned)
    assert stat.S_IMODE(planned.path.stat().st_mode) == 0o600
    assert planned.path.read_text().splitlines()[:2] == ["DIRENV_ALLOW='1'", "ENABLE_CRI='docker,podman'"]
    names = ["DIRENV_ALLOW", "ENABLE_CRI", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"]
    assert _source(planned.path, shell, names) == ["1", "docker,podman", SECRET, "UNSET"]
    assert sorted(p.name for p in planned.path.parent.iterdir()) == [".microvm-env"]  # no temp file left
    assert SECRET not in repr(planned)


def test_env_file_defaults_and_the_flavor_picks_its_key(tmp_path: Path) -> None:
    env = {"ANTHROPIC_API_KEY": "a", "GEMINI_API_KEY": "g", "OPENAI_API_KEY": "o"}
    launcher.write_env_file(_env_file(tmp_path, env, Agent.GEMINI))
    text = (tmp_path / "agent-home" / ".microvm-env").read_text()
    assert text == "DIRENV_ALLOW='0'\nENABLE_CRI=''\nGEMINI_API_KEY='g'\n"


def test_env_file_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    home = tmp_path / "agent-home"
    home.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (home / ".microvm-env").symlink_to(victim)
    launcher.write_env_file(_env_file(tmp_path, {}))
    assert victim.read_text() == "keep me\n"
    assert not (home / ".microvm-env").is_symlink()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"DIRENV_ALLOW": "yes"}, "DIRENV_ALLOW is 'yes'"),
        ({"ENABLE_CRI": "docker,kubernetes"}, "'kubernetes'"),
        ({"ANTHROPIC_API_KEY": "sk-SECRET-VALUE\nsecond"}, "ANTHROPIC_API_KEY contains a line break"),
    ],
)
def test_bad_launcher_variables_are_refused_without_echoing_secrets(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, env: dict[str, str], needle: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SupervisorError) as caught:
        _plan(tmp_path, {"work-dir": str(work)}, env=env)
    assert needle in caught.value.message
    assert "SECRET" not in caught.value.message
    result = run_supervisor(
        ["run", "--work-dir", str(work), "--agent-home", str(tmp_path / "ah"), "--runtime-dir",
         str(short_runtime), "--", "true"],
        env=env,
    )  # fmt: skip
    assert result.returncode == 64, result.stderr
    assert needle in result.stderr and "SECRET" not in result.stderr
    assert not (tmp_path / "ah").exists()  # refused before anything was created


# ---- the dev-shell cache -----------------------------------------------------------------------

STUB = """#!/bin/sh
# a stand-in for {name}: records its argv and environment, prints a dev shell or fails
echo "$0 $*" >> "{log}"
env >> "{log}.env"
if [ -e "{fail}" ]; then echo "error: boom from {name}" >&2; exit 1; fi
echo "export DEVSHELL_MARK=$(wc -l < "{log}")"
"""


def _stub_tools(tmp_path: Path) -> tuple[Path, Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, fail = tmp_path / "tool.log", tmp_path / "FAIL"
    for name in ("nix", "devenv"):
        (bin_dir / name).write_text(STUB.format(name=name, log=log, fail=fail))
        (bin_dir / name).chmod(0o755)
    return bin_dir, log, fail


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _instant_qemu(where: Path) -> Path:
    """A QEMU that answers the preflight's queries like the real one, and otherwise notes that it was
    started (in instant-qemu.started) and exits: launches whose VM does not matter (the cache step
    before it is what is looked at)."""
    path = where / "instant-qemu"
    path.write_text(
        '#!/bin/sh\ncase "$*" in -version|*" help") exec /usr/bin/qemu-system-x86_64 "$@" ;; esac\n'
        'echo started >> "$0.started"\nexit 0\n'
    )
    path.chmod(0o755)
    return path


def _state_home(bin_dir: Path) -> str:
    """The test's own XDG_STATE_HOME, next to its stub tools: where `allow` records approvals."""
    return str(bin_dir.parent / "state")


def allow_devshell(work: Path, bin_dir: Path) -> None:
    """What the user does on the host after reviewing the project's Nix files (devallow.py)."""
    result = run_supervisor(["allow", "--work-dir", str(work)], env={"XDG_STATE_HOME": _state_home(bin_dir)})
    assert result.returncode == 0, result.stderr


def _launch(runtime: Path, work: Path, home: Path, bin_dir: Path, env: Mapping[str, str]) -> str:
    """A launch whose VM exits at once: the cache step before it is what is looked at."""
    qemu = _instant_qemu(bin_dir)
    starts = qemu.with_name(qemu.name + ".started")
    before = starts.read_text() if starts.exists() else ""
    result = run_supervisor(
        ["run", "--work-dir", str(work), "--agent-home", str(home), "--runtime-dir", str(runtime),
         "--qemu", str(qemu), "-v"],
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_STATE_HOME": _state_home(bin_dir), **env},
    )  # fmt: skip
    assert starts.read_text() == before + "started\n", result.stderr  # the launch went on to start QEMU
    assert leftovers(runtime) == []
    return result.stderr


def test_devshell_cache_miss_hit_invalidation(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    bin_dir, log, _ = _stub_tools(tmp_path)
    work, home = tmp_path / "proj", tmp_path / "home"
    work.mkdir()
    (work / "flake.nix").write_text("{ }\n")
    (work / "flake.lock").write_text("{}\n")
    allow = {"DIRENV_ALLOW": "1", "ANTHROPIC_API_KEY": SECRET}
    allow_devshell(work, bin_dir)
    _launch(short_runtime, work, home, bin_dir, allow)
    assert _calls(log) == [f"{bin_dir}/nix print-dev-env --no-update-lock-file {work}"]
    assert (home / ".microvm-devshell").read_text() == "export DEVSHELL_MARK=1\n"
    seed_hash = subprocess.run(
        ["bash", "-c", "cd \"$1\" && (cat flake.nix flake.lock .devenv.flake.nix devenv.nix devenv.yaml "
         "devenv.lock 2>/dev/null || true) | sha256sum | cut -c1-16", "seed", str(work)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert (home / ".microvm-devshell.hash").read_text().strip() == seed_hash
    assert SECRET not in (tmp_path / "tool.log.env").read_text()  # the key never reaches the tool

    _launch(short_runtime, work, home, bin_dir, allow)  # hit: nothing changed
    assert len(_calls(log)) == 1

    (work / "flake.lock").write_text('{"changed": true}\n')  # invalidation
    allow_devshell(work, bin_dir)
    _launch(short_runtime, work, home, bin_dir, allow)
    assert len(_calls(log)) == 2
    assert (home / ".microvm-devshell").read_text() == "export DEVSHELL_MARK=2\n"

    (work / "devenv.nix").write_text("{ }\n")  # flake-based devenv: --impure
    allow_devshell(work, bin_dir)
    _launch(short_runtime, work, home, bin_dir, allow)
    assert _calls(log)[-1] == f"{bin_dir}/nix print-dev-env --no-update-lock-file --impure {work}"
    assert sorted(p.name for p in home.iterdir() if p.name.startswith(".microvm-devshell")) == [
        ".microvm-devshell",
        ".microvm-devshell.hash",
    ]


def test_devshell_devenv_only_with_direnv_allow(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    """Regression: the seed's `[ DIRENV_ALLOW = 1 ] && [ -f flake.nix ] || [ -f .devenv.flake.nix ]`
    cached devenv projects even without DIRENV_ALLOW=1; the README says it is only done with it."""
    bin_dir, log, _ = _stub_tools(tmp_path)
    work, home = tmp_path / "proj", tmp_path / "home"
    work.mkdir()
    (work / ".devenv.flake.nix").write_text("{ }\n")
    _launch(short_runtime, work, home, bin_dir, {})
    _launch(short_runtime, work, home, bin_dir, {"DIRENV_ALLOW": "0"})
    assert _calls(log) == []
    assert not (home / ".microvm-devshell").exists()
    allow_devshell(work, bin_dir)
    _launch(short_runtime, work, home, bin_dir, {"DIRENV_ALLOW": "1"})
    assert _calls(log) == [f"{bin_dir}/devenv print-dev-env"]


def test_devshell_failure_goes_to_err_and_does_not_stop_the_launch(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    bin_dir, log, fail = _stub_tools(tmp_path)
    work, home = tmp_path / "proj", tmp_path / "home"
    work.mkdir()
    (work / "flake.nix").write_text("{ }\n")
    allow_devshell(work, bin_dir)
    _launch(short_runtime, work, home, bin_dir, {"DIRENV_ALLOW": "1"})
    good = (home / ".microvm-devshell").read_text()
    (work / "flake.nix").write_text("{ broken }\n")
    allow_devshell(work, bin_dir)
    fail.touch()
    stderr = _launch(short_runtime, work, home, bin_dir, {"DIRENV_ALLOW": "1"})
    assert "could not cache the dev shell" in stderr
    assert (home / ".microvm-devshell.err").read_text() == "error: boom from nix\n"
    assert (home / ".microvm-devshell").read_text() == good  # the last good cache stays
    assert not list(home.glob("*.tmp"))
    assert len(_calls(log)) == 2


def test_devshell_tool_missing_is_reported_in_err(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    work, home = tmp_path / "proj", tmp_path / "home"
    work.mkdir()
    (work / "flake.nix").write_text("{ }\n")
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    allow_devshell(work, empty)
    result = run_supervisor(
        ["run", "--work-dir", str(work), "--agent-home", str(home), "--runtime-dir", str(short_runtime),
         "--qemu", str(_instant_qemu(empty))],
        env={"DIRENV_ALLOW": "1", "PATH": str(empty), "XDG_STATE_HOME": _state_home(empty)},  # no nix here
    )  # fmt: skip
    assert "nix was not found on PATH" in (home / ".microvm-devshell.err").read_text(), result.stderr


# ---- port forwards -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("8080:80", "hostfwd=tcp:127.0.0.1:8080-:80"),
        ("0.0.0.0:2222:22", "hostfwd=tcp:0.0.0.0:2222-:22"),
        ("5353:53/udp", "hostfwd=udp:127.0.0.1:5353-:53"),
    ],
)
def test_forward_syntax(text: str, rule: str) -> None:
    assert launcher.parse_forward(text).hostfwd() == rule


@pytest.mark.parametrize("text", ["80", "a:b", "0:80", "8080:70000", "host:1:2", "1:2/sctp", "1:2:3:4"])
def test_bad_forwards_are_refused(text: str) -> None:
    with pytest.raises(SupervisorError, match="invalid port forward"):
        launcher.parse_forward(text)


@pytest.mark.parametrize(
    ("machine", "device"),
    [(config.Machine.Q35, "virtio-net-pci,netdev=agentvm-net,romfile="),
     (config.Machine.MICROVM, "virtio-net-device,netdev=agentvm-net")],
)  # fmt: skip
def test_forwards_in_our_qemu_command(tmp_path: Path, machine: config.Machine, device: str) -> None:
    """The argv only; test_two_guests_at_once_serve_their_tcp_and_udp_forwards_and_reach_the_host
    is the outcome."""
    forwards = launcher.parse_forwards(["8080:80", "5353:53/udp"])
    spec = QemuSpec(
        binary="qemu", instance="i", machine=machine, accel=config.Accel.TCG, cpu="max",
        kernel=tmp_path / "k", initrd=None, cmdline="", memory_mib=512, vcpus=1, shares=[],
        private_qmp_fd=3, public_qmp_fd=4, status_fd=5, extra_args=[],
        network=network.plan_network(forwards, builtin_guest=True),
    )  # fmt: skip
    argv = qemu_argv(spec)
    at = argv.index("-netdev")
    assert argv[at : at + 4] == [
        "-netdev",
        "user,id=agentvm-net,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,dhcpstart=10.0.2.15,"
        "hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp:127.0.0.1:5353-:53",
        "-device",
        device,
    ]
    with pytest.raises(SupervisorError, match="forwarded twice"):
        launcher.parse_forwards(["8080:80", "8080:81"])


# ---- real VMs ----------------------------------------------------------------------------------


def _free_ports(count: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> list[int]:
    """Ports free now and all different: each probe stays bound until all are chosen (one at a
    time, the kernel may hand out a port it just gave back)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket(socket.AF_INET, kind)) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]


def _listening(port: int) -> bool:
    with socket.socket() as client:
        client.settimeout(2)
        return client.connect_ex(("127.0.0.1", port)) == 0


def _descendants(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *_descendants(child)]
    return found


def _devshell_stub(bin_dir: Path, tool_dir: str) -> None:
    """A `nix` whose dev shell exports a variable and puts a tool on PATH, as a real one would."""
    bin_dir.mkdir()
    (bin_dir / "nix").write_text(
        f"#!/bin/sh\necho 'export DEVSHELL_MARK=devshell-ok'\necho 'export PATH={tool_dir}:$PATH'\n"
    )
    (bin_dir / "nix").chmod(0o755)


@pytest.mark.vm
def test_guest_command_gets_env_file_and_dev_shell_and_the_key_is_in_no_host_argv_environ_or_log(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    """The guest sources .microvm-env and the cached dev shell itself (the command does nothing to
    get them), for `-- CMD` and for a login shell; the key is seen by the guest command only."""
    bin_dir = tmp_path / "bin"
    _devshell_stub(bin_dir, "/work/devtools")
    work, runtime = tmp_path / "proj", short_runtime
    (work / "devtools").mkdir(parents=True)
    (work / "devtools" / "devtool").write_text("#!/bin/sh\necho devtool-ran\n")
    (work / "devtools" / "devtool").chmod(0o755)
    (work / "flake.nix").write_text("{ }\n")
    data, state = tmp_path / "data", tmp_path / "state"
    allow_devshell(work, bin_dir)
    script = (
        'printf %s "$ANTHROPIC_API_KEY" | sha256sum | cut -d" " -f1 > /work/keyhash; '
        'echo "$DIRENV_ALLOW $ENABLE_CRI $DEVSHELL_MARK $(devtool)" > /work/vars; '
        # a login shell started from nothing gets the same through /etc/profile
        "env -i HOME=/home/agent sh -l -c 'echo \"$DEVSHELL_MARK $(devtool)\"' > /work/login-vars; "
        "echo GUEST-READY; while [ ! -e /work/go ]; do sleep 0.1; done"
    )
    sup = launch(
        ["run", "--runtime-dir", str(runtime), "-v", "--", "sh", "-c", script],
        env={"WORK_DIR": str(work), "XDG_DATA_HOME": str(data), "XDG_STATE_HOME": str(state),
             "DIRENV_ALLOW": "1", "ENABLE_CRI": "crio", "ANTHROPIC_API_KEY": SECRET,
             "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )  # fmt: skip
    sup.read_until(b"GUEST-READY")
    [instance_dir] = runtime.iterdir()
    assert re.fullmatch(r"proj-claude-vm-[0-9a-f]{8}", instance_dir.name)
    descendants = _descendants(sup.proc.pid)
    assert len(descendants) >= 5  # the watchdog, QEMU and three virtiofsd (and their sandbox children)
    for pid in [sup.proc.pid, *descendants]:  # the supervisor blanks the key in its own environ too
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for what in ("cmdline", "environ"):
                assert b"sk-ant-TEST" not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)
    for path in instance_dir.rglob("*"):
        if path.is_file():
            assert b"sk-ant-TEST" not in path.read_bytes(), path
    (work / "go").touch()
    code, _, stderr = sup.finish()
    assert code == 0, stderr
    assert "sk-ant-TEST" not in stderr
    [console_log] = (state / "agentvm-supervise" / "console").iterdir()
    assert b"sk-ant-TEST" not in console_log.read_bytes()
    assert (work / "keyhash").read_text().strip() == hashlib.sha256(SECRET.encode()).hexdigest()
    assert (work / "vars").read_text() == "1 crio devshell-ok devtool-ran\n"
    assert (work / "login-vars").read_text() == "devshell-ok devtool-ran\n"
    [home] = (data / "claude-microvm").iterdir()
    assert home.name == f"proj-{hashlib.sha256(str(work).encode()).hexdigest()[:12]}"
    assert stat.S_IMODE((home / ".microvm-env").stat().st_mode) == 0o600
    assert wait_until_gone("proj-claude-vm") == []
    assert leftovers(runtime) == []


class _HostHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"host answers {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _udp_exchange(port: int, payload: bytes, attempts: int = 20) -> bytes:
    """Send until answered: the server may still be starting, and UDP may drop the first one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(1)
        for _ in range(attempts):
            client.sendto(payload, ("127.0.0.1", port))
            with contextlib.suppress(TimeoutError):
                return client.recv(2048)
    raise AssertionError(f"no UDP answer through 127.0.0.1:{port}")


@pytest.mark.vm
def test_two_guests_at_once_serve_their_tcp_and_udp_forwards_and_reach_the_host(
    guest_assets: guest.GuestAssets, udp_echo: Path, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    """Two launches on one project, a q35 and a microvm guest, running at once with their own ids:
    each serves HTTP and UDP to the host through its forwards, and fetches from a host server on
    10.0.2.2 (slirp maps it to the host's 127.0.0.1)."""
    work, runtime = tmp_path / "shared-proj", short_runtime
    work.mkdir()
    shutil.copy(udp_echo, work / "udp-echo")
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HostHandler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    host_port = host.server_address[1]
    tcp_ports, udp_ports = _free_ports(2), _free_ports(2, socket.SOCK_DGRAM)
    guests = (
        ("a", "b", "q35", tcp_ports[0], udp_ports[0]),
        ("b", "a", "microvm", tcp_ports[1], udp_ports[1]),
    )
    sups = []
    try:
        for mine, other, machine, tcp, udp in guests:
            (work / mine).mkdir()
            (work / mine / "index.html").write_text(f"served by guest {mine}\n")
            script = (
                f"httpd -p 8080 -h /work/{mine} && (/work/udp-echo 5353 {mine}: &) && "
                f"wget -q -O /work/{mine}/from-host http://10.0.2.2:{host_port}/from-{mine}; "
                # each guest waits to see the other's file: both must be running at the same time
                f"touch /work/{mine}-up; while [ ! -e /work/{other}-up ]; do sleep 0.1; done; echo BOTH-UP; "
                "while [ ! -e /work/go ]; do sleep 0.1; done"
            )
            sups.append(
                launch(
                    ["run", "--runtime-dir", str(runtime), "--machine", machine, "--forward", f"{tcp}:8080",
                     "--forward", f"{udp}:5353/udp", "--", "sh", "-c", script],
                    env={"HOME": str(tmp_path / "home")},
                    cwd=work,
                )
            )  # fmt: skip
        for sup in sups:
            sup.read_until(b"BOTH-UP", timeout=120)
        names = sorted(path.name for path in runtime.iterdir())
        assert len(names) == 2 and names[0] != names[1]
        assert all(re.fullmatch(r"shared-proj-claude-vm-[0-9a-f]{8}", name) for name in names)
        for mine, _, machine, tcp, udp in guests:
            with urllib.request.urlopen(f"http://127.0.0.1:{tcp}/index.html", timeout=10) as answer:
                assert answer.read() == f"served by guest {mine}\n".encode(), machine
            assert _udp_exchange(udp, b"ping") == f"{mine}:ping".encode(), machine
            assert (work / mine / "from-host").read_text() == f"host answers /from-{mine}\n", machine
        (work / "go").touch()
        for sup in sups:
            code, _, stderr = sup.finish()
            assert code == 0, stderr
    finally:
        host.shutdown()
        host.server_close()
    assert wait_until_gone("shared-proj-claude-vm") == []
    assert leftovers(runtime) == []
    assert not any(_listening(port) for port in tcp_ports)
    [home] = (tmp_path / "home" / ".local" / "share" / "claude-microvm").iterdir()
    assert (home / ".microvm-env").read_text() == "DIRENV_ALLOW='0'\nENABLE_CRI=''\n"


def test_sigint_during_the_devshell_refresh_stops_it_and_leaves_nothing(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path, launch: Launch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nix").write_text("#!/bin/sh\necho STARTED >&2\nexec sleep 600\n")
    (bin_dir / "nix").chmod(0o755)
    work, home = tmp_path / "proj", tmp_path / "home"
    work.mkdir()
    (work / "flake.nix").write_text("{ }\n")
    allow_devshell(work, bin_dir)
    sup = launch(
        ["run", "--work-dir", str(work), "--agent-home", str(home), "--runtime-dir", str(short_runtime),
         "--name", "dsint", "-v", "--", "true"],
        env={"DIRENV_ALLOW": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_STATE_HOME": _state_home(bin_dir)},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("sleep 600" in c for _, c in instance_processes("dsint")):
        time.sleep(0.1)
    sup.signal(signal.SIGINT)
    code, _, stderr = sup.finish()
    assert code == 128 + signal.SIGINT, stderr
    assert wait_until_gone("dsint") == []
    assert leftovers(short_runtime) == []
    assert not (home / ".microvm-devshell").exists()
    assert not list(home.glob("*.tmp"))


def test_children_get_neither_api_keys_nor_the_notify_socket() -> None:
    env = {"PATH": "/bin", "ANTHROPIC_API_KEY": "a", "GEMINI_API_KEY": "g", "OPENAI_API_KEY": "o",
           "NOTIFY_SOCKET": "/run/x", "TERM": "xterm"}  # fmt: skip
    assert launcher.child_environment(env, {"AGENTVM_INSTANCE": "i"}) == {
        "PATH": "/bin",
        "TERM": "xterm",
        "AGENTVM_INSTANCE": "i",
    }


def test_probes_get_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the preflight's probes (`qemu -version`, `-device help`) ran with the whole
    environment, API key included."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    result = children.probe(["sh", "-c", 'echo "key=${ANTHROPIC_API_KEY-unset} lc=$LC_ALL"'])
    assert (result.status, result.output) == (0, "key=unset lc=C\n")
