"""Regression tests for the defects of issue 11 (an adversarial pass), one per defect, named after it.

They run the real supervisor with the stub children of the fault suite (tests/stubs/), steered to act
as a hostile guest would, and look at what a user would see: the exit status, the message, the disk,
the processes and their environments.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import msgspec
import pytest

from supervisor import config, guest, launcher, plan, qemu, runtime, statusport
from supervisor.children import read_start_ticks
from supervisor.console.log import open_log
from supervisor.errors import ExitCode, SupervisorError
from supervisor.watchdog import Watchdog
from tests.faults import Case, Player, _cmdline, check, fixed_case, report
from tests.runner_fixtures import RunnerFixture, qemu_command
from tests.support import TEST_CACHE, base_env, run_supervisor, supervisor_argv, user_ids
from tests.test_launcher import _calls, _launch, _stub_tools, allow_devshell


class _Player(Player):
    """A fault-suite player with extra environment for the stubs."""

    def __init__(self, case: Case, root: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__(case, root, None)
        self.extra_env = dict(env or {})

    def _env(self) -> dict[str, str]:
        return {**super()._env(), **self.extra_env}


def _disk_usage(path: Path) -> int:
    total = 0
    for entry in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += entry.lstat().st_blocks * 512
    return total


# ---- D4, D5: the status port -----------------------------------------------------------------


def test_status_port_flood_fills_neither_disk_nor_memory(shared_tmp: Path) -> None:
    """A guest writing 128 MiB to its status port grew a file in the runtime dir at 60 MB/s, which the
    supervisor then parsed whole (GBs of memory); it is now read with a 64 KiB bound and reported."""
    case = fixed_case(builtin=True, qemu_behaviour="flood-status")
    player = _Player(case, shared_tmp, {"STUB_QEMU_FLOOD_MB": "128"})
    player.setup()
    player.launch()
    try:
        assert player.wait_marker(), player.result.stdout
        largest = 0
        # The stub floods right after GUEST-READY; watch the runtime dir until it has written it all.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"FLOOD-DONE" not in player.result.stdout:
            largest = max(largest, _disk_usage(player.runtime))
            player.pump(0.05)
        assert b"FLOOD-DONE" in player.result.stdout
        largest = max(largest, _disk_usage(player.runtime))
        assert largest < 1 << 20, f"the runtime dir held {largest} bytes"
        assert player.proc is not None
        status = Path(f"/proc/{player.proc.pid}/status").read_text()
        peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        assert peak_kib < 200 << 10, f"the supervisor's peak RSS was {peak_kib} KiB"
        player.trigger_end()
        player.finish()
    finally:
        player.cleanup()
    result = player.result
    assert result.code == 77, result.stderr
    assert "more than 64 KiB to its status port" in result.stderr
    assert not result.left_processes and not result.left_files


@pytest.mark.parametrize(
    "line",
    [
        "agentvm-exit-status=256",
        "agentvm-exit-status=\u00b2",
        "agentvm-exit-status=-1",
        "agentvm-exit-status=1e3",
    ],
)
def test_status_out_of_range_or_not_ascii_is_a_clear_guest_error(shared_tmp: Path, line: str) -> None:
    """`agentvm-exit-status=²` crashed the supervisor (str.isdigit then int: exit 70), and 256 was
    taken as a status (the run exited 0). Only 1-3 ASCII digits in 0..255 are a status."""
    case = fixed_case(builtin=True, qemu_behaviour="exit-at-once")
    player = _Player(case, shared_tmp, {"STUB_QEMU_STATUS_LINE": line})
    result = player.play()
    assert result.code == 77, result.stderr
    assert "reported an invalid exit status" in result.stderr
    assert "internal error" not in result.stderr
    assert not result.left_processes and not result.left_files


def test_status_in_range_is_still_the_exit_status(shared_tmp: Path) -> None:
    case = fixed_case(builtin=True)
    result = _Player(case, shared_tmp).play()
    problems = check(case, result)
    assert not problems, report(case, result, problems)


@pytest.mark.parametrize(
    ("data", "status", "invalid"),
    [
        (b"agentvm-exit-status=0\n", 0, False),
        (b"agentvm-exit-status=255\r\n", 255, False),
        (b"agentvm-exit-status=007\n", 7, False),
        (b"agentvm-exit-status=256\n", None, True),
        (b"agentvm-exit-status=1234\n", None, True),
        (b"agentvm-exit-status=\xc2\xb2\n", None, True),
        (b"agentvm-exit-status=\xd9\xa3\n", None, True),  # ARABIC-INDIC DIGIT THREE: isdigit() is True
        (b"agentvm-exit-status=\n", None, True),
        (b"agentvm-exit-status=300\nagentvm-exit-status=4\n", 4, False),  # the last line decides
        (b"noise\n", None, False),
    ],
)
def test_status_parsing_is_strict(data: bytes, status: int | None, invalid: bool) -> None:
    report_ = statusport.parse_status(data)
    assert report_.exit_status == status
    assert (report_.invalid is not None) == invalid
    assert (report_.problem() is not None) == invalid


def test_guest_error_text_loses_control_characters() -> None:
    """The guest's error text is printed on the user's terminal: no escape sequences get through."""
    report_ = statusport.parse_status(b"agentvm-guest-error=bad \x1b]0;owned\x07 thing" + b"x" * 1000 + b"\n")
    assert report_.error is not None
    assert "\x1b" not in report_.error and "\x07" not in report_.error
    assert len(report_.error) <= statusport.ERROR_TEXT_MAX + 3


# ---- D6: control characters in paths -----------------------------------------------------------


def test_newline_in_runtime_dir_is_refused_before_anything_runs(shared_tmp: Path) -> None:
    """`runtime-dir = "/tmp/x/precious\\nx"` reached the watchdog, whose line protocol then removed
    /tmp/x/precious when the supervisor was SIGKILLed."""
    precious = shared_tmp / "precious"
    precious.mkdir()
    (precious / "keep").write_text("mine\n")
    weird = f"{precious}\nx"
    result = run_supervisor(["run", "--runtime-dir", weird, "--", "true"], cwd=shared_tmp)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "`$.runtime-dir` is a path with a control character (\\n)" in result.stderr
    assert not Path(weird).exists()
    assert (precious / "keep").read_text() == "mine\n"


@pytest.mark.parametrize("variable", ["WORK_DIR", "AGENT_HOME", "XDG_RUNTIME_DIR"])
def test_control_character_in_a_path_variable_is_refused(shared_tmp: Path, variable: str) -> None:
    weird = shared_tmp / "a\x1b]0;x\x07b"
    weird.mkdir()
    result = run_supervisor(["run", "--", "true"], env={variable: str(weird)}, cwd=shared_tmp)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert f"${variable}" in result.stderr and "control character (\\x1b)" in result.stderr
    assert "\x1b" not in result.stderr  # named, not sent to the terminal


def test_config_fuzz_shapes_control_characters_in_every_path_field(tmp_path: Path) -> None:
    for field in sorted(config.PATH_FIELDS):
        document: dict[str, object] = {field: "/tmp/a\tb"}
        if field in ("source", "guest-path"):
            document = {"shares": [{"tag": "t", "source": "/tmp/s", field: "/tmp/a\tb"}]}
        elif field in ("binary", "kvm-device", "kernel", "initrd"):
            document = {"qemu": {field: "/tmp/a\tb"}}
        elif field in ("script", "cwd"):
            document = {"runner": {"script": "/tmp/s", field: "/tmp/a\tb"}}
        elif field == "log-dir":
            document = {"console": {field: "/tmp/a\tb"}}
        with pytest.raises(SupervisorError) as caught:
            config.load(None, document)
        assert "control character (\\t)" in caught.value.message, field


def test_watchdog_protocol_keeps_a_newline_inside_a_path(tmp_path: Path) -> None:
    """The watchdog split its messages at newlines: `dir /x/precious\\nx` removed /x/precious."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("mine\n")
    weird = tmp_path / "precious\nx"
    weird.mkdir()
    watchdog = Watchdog.start()
    watchdog.guard_dir(weird)
    os.close(watchdog._write_fd)  # the supervisor died without saying "done"
    watchdog._proc.wait()
    assert (precious / "keep").read_text() == "mine\n"
    assert not weird.exists()


# ---- D7: commas in QEMU option values ------------------------------------------------------------


@pytest.mark.vm
def test_comma_in_runtime_dir_cannot_add_qemu_options(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    """`--runtime-dir '/tmp/rt,logfile=/tmp/leak'` added a logfile= option to QEMU's -chardev."""
    base = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
    try:
        runtime_dir = base / "rt,logfile=leak"
        work = tmp_path / "work"
        work.mkdir()
        args = ["run", "--name", "comma", "--work-dir", str(work), "--agent-home", str(tmp_path / "home")]
        result = run_supervisor(
            [*args, "--runtime-dir", str(runtime_dir), "--", "sh", "-c", "exit 5"], cwd=base
        )
        assert result.returncode == 5, result.stderr
        assert sorted(path.name for path in base.iterdir()) == [runtime_dir.name]
        assert list(runtime_dir.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_comma_in_a_path_is_escaped_in_our_qemu_options(tmp_path: Path) -> None:
    spec = qemu.QemuSpec(
        binary="qemu", instance="i", machine=config.Machine.Q35, accel=config.Accel.TCG, cpu="max",
        kernel=tmp_path / "k", initrd=None, cmdline="", memory_mib=512, vcpus=1,
        shares=[("work", Path("/tmp/rt,logfile=/tmp/leak/work.sock"))],
        private_qmp_fd=3, public_qmp_fd=4, status_fd=5, extra_args=[],
    )  # fmt: skip
    argv = qemu.qemu_argv(spec)
    assert "socket,id=fs0,path=/tmp/rt,,logfile=/tmp/leak/work.sock" in argv


def test_comma_in_the_runtime_dir_is_escaped_in_a_rewritten_runner(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    fixture = RunnerFixture(tmp_path / "runner")
    fixture.write(qemu_command(guest_assets, guest_command=["true"]))
    work = tmp_path / "proj"
    work.mkdir()
    checked = plan.build_plan(
        config.load(
            None,
            {"runner": {"script": str(fixture.directory)}, "work-dir": str(work), "runtime-dir": "/tmp/a,b"},
        ),
        env={"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE), "HOME": str(tmp_path / "home")},
        cwd=tmp_path,
        command=None,
    )
    assert checked.runner is not None
    rendered = checked.runner.render(checked.instance_dir, 42)
    escaped = str(checked.instance_dir).replace(",", ",,")
    assert f"socket,id=fs0,path={escaped}/work.sock" in rendered
    assert f"unix:{escaped}/qmp.sock,server,nowait" in rendered
    assert "path=/tmp/a,b" not in rendered


# ---- D8: secrets in children's environments; D9: a stop signal during the preflight -------------

SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-secret-1",
    "GEMINI_API_KEY": "gemini-secret-2",
    "OPENAI_API_KEY": "openai-secret-3",
    "MY_SERVICE_API_KEY": "service-secret-4",
    "GITHUB_TOKEN": "ghp-secret-5",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-6",
}


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = [int(child) for child in (task / "children").read_text().split()]
                found += children
                todo += children
    return found


def test_no_child_gets_the_api_keys_or_tokens(shared_tmp: Path) -> None:
    """Preflight probes got `{**os.environ}`, the forked watchdog kept the supervisor's environment,
    the guest build script inherited it: ANTHROPIC_API_KEY (and any token) was readable in their
    /proc/PID/environ. Every child now gets an explicit environment without secrets."""
    env_log = shared_tmp / "environments"
    case = fixed_case(builtin=True)
    player = _Player(case, shared_tmp / "case", {**SECRETS, "STUB_ENV_LOG": str(env_log)})
    (shared_tmp / "case").mkdir()
    player.setup()
    player.launch()
    environments: dict[str, bytes] = {}
    try:
        assert player.wait_marker(), player.result.stdout
        assert player.proc is not None
        own = Path(f"/proc/{player.proc.pid}/environ").read_bytes()
        for pid in _descendants(player.proc.pid):  # the watchdog, virtiofsd and their sandboxes, QEMU
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                environments[f"{pid} {cmdline}"] = Path(f"/proc/{pid}/environ").read_bytes()
        player.trigger_end()
        player.finish()
    finally:
        player.cleanup()
    assert player.result.code == 3, player.result.stderr
    logged = env_log.read_text()
    assert "-version" in logged and "--version" in logged  # the probes of QEMU and virtiofsd
    for name, value in SECRETS.items():
        for process, environ in environments.items():
            assert value.encode() not in environ, f"{name} in the environment of {process}"
        assert value not in logged, f"{name} reached a probe or a child"
        # The supervisor blanks them in its own initial environment block too (scrub_proc_environ).
        assert value.encode() not in own, f"{name} in the supervisor's /proc/PID/environ"
    assert len(environments) >= 5, list(environments)  # watchdog, QEMU, 3 virtiofsd (+ sandboxes)
    assert any("fake_qemu" in name for name in environments), list(environments)


def test_stop_signal_during_the_preflight_kills_and_reaps_the_probe(shared_tmp: Path) -> None:
    """A slow `-version` probe kept running under PID 1 after the supervisor, stopped by SIGTERM
    during the preflight, said nothing was left behind."""
    case = fixed_case(builtin=True)
    player = _Player(case, shared_tmp, {"STUB_QEMU_PROBE_SLEEP": "60"})
    player.setup()
    player.launch()
    try:
        assert player.proc is not None
        deadline = time.monotonic() + 30
        probe = None
        while probe is None and time.monotonic() < deadline and player.alive():
            probe = next(
                (pid for pid in _descendants(player.proc.pid) if "fake_qemu.py -version" in _cmdline(pid)),
                None,
            )
            time.sleep(0.01)
        assert probe is not None, "the slow probe never started"
        player.proc.send_signal(signal.SIGTERM)
        player.finish()
    finally:
        player.cleanup()
    result = player.result
    assert result.code == 128 + signal.SIGTERM, result.stderr
    assert "stopped by SIGTERM while starting" in result.stderr
    assert not Path(f"/proc/{probe}").exists() or "fake_qemu" not in _cmdline(probe)
    assert result.left_processes == []


# ---- D2: state files in another user's runtime dir ------------------------------------------------


def _sleeper(user: str | None = None) -> subprocess.Popen[bytes]:
    """A process group leader standing for a process of root's (or `user`'s) that is not an agentvm's."""
    ids = user_ids(user) if user else None
    return subprocess.Popen(
        ["sleep", "300"],
        start_new_session=True,
        user=ids[0] if ids else None,
        group=ids[1] if ids else None,
        extra_groups=[] if ids else None,
    )


def _plant_state(instance_dir: Path, victim: int, *, supervisor_ticks: int = 1) -> None:
    """A state.json of a dead supervisor whose 'leftover' group is `victim`."""
    instance_dir.mkdir(mode=0o700)
    state = runtime.InstanceState(
        instance=instance_dir.name,
        supervisor_pid=2**22 - 7,  # no such process: the instance looks stale
        supervisor_start_ticks=supervisor_ticks,
        created=0.0,
        groups=(runtime.GroupRecord("runner", victim, read_start_ticks(victim)),),
    )
    (instance_dir / "state.json").write_bytes(msgspec.json.encode(state))


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def test_list_as_root_on_another_users_runtime_dir_kills_nothing(shared_tmp: Path, test_user: str) -> None:
    """A user wrote a state.json naming root's process group into their runtime dir; root ran
    `list --runtime-dir` on it, and the stale-instance cleanup SIGKILLed root's process."""
    uid, gid = user_ids(test_user)
    base = shared_tmp / "agentvm-user"
    victim = _sleeper()
    try:
        base.mkdir(mode=0o700)
        _plant_state(base / "x-claude-vm-00000000", victim.pid)
        for path in (base, base / "x-claude-vm-00000000", base / "x-claude-vm-00000000" / "state.json"):
            os.chown(path, uid, gid)
        for verb in (["list"], ["status"], ["stop", "--no-wait"], ["attach"]):
            result = run_supervisor([*verb, "--runtime-dir", str(base)])
            assert result.returncode == ExitCode.USAGE, (verb, result.stderr)
            assert f"belongs to uid {uid}, not to this user" in result.stderr
            time.sleep(0.05)
            assert _alive(victim), f"{verb} killed root's process"
        assert (base / "x-claude-vm-00000000").exists()
    finally:
        victim.kill()
        victim.wait()


def test_stale_cleanup_signals_only_groups_its_supervisor_could_have_started(
    short_runtime: Path, test_user: str
) -> None:
    """In our own runtime dir, a state.json still names only what it names: another user's process,
    one older than the recorded supervisor, or any process in a dir others may write, is left alone."""
    foreign = _sleeper(test_user)
    older = _sleeper()
    planted = _sleeper()
    try:
        time.sleep(0.05)
        _plant_state(short_runtime / "a-claude-vm-00000001", foreign.pid)
        _plant_state(
            short_runtime / "b-claude-vm-00000002",
            older.pid,
            supervisor_ticks=read_start_ticks(older.pid) + 1,
        )
        _plant_state(short_runtime / "c-claude-vm-00000003", planted.pid)
        (short_runtime / "c-claude-vm-00000003").chmod(0o777)
        result = run_supervisor(["list", "--runtime-dir", str(short_runtime)])
        assert result.returncode == 0, result.stderr
        time.sleep(0.05)
        assert _alive(foreign) and _alive(older) and _alive(planted)
    finally:
        for proc in (foreign, older, planted):
            proc.kill()
            proc.wait()


def test_stale_cleanup_still_kills_what_a_dead_supervisor_left(short_runtime: Path) -> None:
    """The checks do not stop the cleanup it is for: our own leftover group of a dead supervisor."""
    leftover = _sleeper()
    try:
        _plant_state(short_runtime / "d-claude-vm-00000004", leftover.pid)
        result = run_supervisor(["list", "--runtime-dir", str(short_runtime)])
        assert result.returncode == 0, result.stderr
        assert "cleaned up d-claude-vm-00000004" in result.stderr
        leftover.wait(timeout=10)
        assert leftover.returncode == -signal.SIGKILL
    finally:
        if _alive(leftover):
            leftover.kill()
            leftover.wait()


# ---- D11: the console log dir ----------------------------------------------------------------------


def test_console_log_dir_of_another_user_is_refused(shared_tmp: Path, test_user: str) -> None:
    """Root used an existing log dir another user owned (0777): that user could swap the log for a
    link to any file, and rotation renamed and opened with O_CREAT following links."""
    uid, gid = user_ids(test_user)
    log_dir = shared_tmp / "logs"
    log_dir.mkdir()
    os.chown(log_dir, uid, gid)
    log_dir.chmod(0o777)
    case = fixed_case(builtin=True, qemu_behaviour="exit-at-once")
    player = _Player(case, shared_tmp / "case")
    (shared_tmp / "case").mkdir()
    player.setup()
    with (player.dir / "config.toml").open("a") as config_file:
        config_file.write(f'[console]\nlog-dir = "{log_dir}"\n')
    player.launch()
    try:
        player.finish()
    finally:
        player.cleanup()
    result = player.result
    assert result.code == ExitCode.CANT_CREATE, result.stderr
    assert f"the console log dir {log_dir} belongs to uid {uid}" in result.stderr
    assert list(log_dir.iterdir()) == []
    assert not result.left_processes and not result.left_files


def test_own_console_log_dir_open_to_others_is_made_private(tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir(mode=0o755)
    log_dir.chmod(0o777)
    log = open_log(log_dir, "i-0001", max_bytes=4096, keep=2)
    log.close()
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700


def test_console_log_never_follows_a_planted_link(tmp_path: Path) -> None:
    """Neither the log nor its rotation may write through a symlink someone planted in the dir."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    log_dir = tmp_path / "logs"
    log_dir.mkdir(mode=0o700)
    (log_dir / "i-0001.log").symlink_to(victim)
    with pytest.raises(SupervisorError) as caught:
        open_log(log_dir, "i-0001", max_bytes=4096, keep=5)
    assert caught.value.exit_code == ExitCode.CANT_CREATE
    # Rotation: a link planted at the new log's name while the old one is renamed away.
    (log_dir / "i-0001.log").unlink()
    log = open_log(log_dir, "i-0001", max_bytes=4096, keep=5)
    log.write(b"x" * 4096)
    log.flush()
    (log_dir / "i-0001.log.1").symlink_to(victim)  # unlinked, not followed, at rotation
    log.write(b"y" * 100)
    log.flush()
    log.close()
    assert victim.read_text() == "precious\n"
    assert not (log_dir / "i-0001.log.1").is_symlink()
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(log_dir)
    with pytest.raises(SupervisorError) as caught:
        open_log(linked_dir, "i-0002", max_bytes=4096, keep=5)
    assert "symlink" in caught.value.message


# ---- also: console-socket flood, .microvm-env planted as a dir, an early signal --------------------


def _closed_by_peer(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False


def test_console_socket_connections_are_capped(shared_tmp: Path) -> None:
    """A flood of connections to console.sock held the supervisor at its fd limit (no cap, unlike
    the control socket); beyond the cap a connection is closed at once."""
    case = fixed_case(builtin=True)
    player = _Player(case, shared_tmp)
    player.setup()
    player.launch()
    flood: list[socket.socket] = []
    try:
        assert player.wait_marker(), player.result.stdout
        assert player.proc is not None
        [console_socket] = player.runtime.glob("*/console.sock")
        fds_before = len(list(Path(f"/proc/{player.proc.pid}/fd").iterdir()))
        for _ in range(200):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(str(console_socket))
            flood.append(conn)
        player.sleep(1.0)
        fds_during = len(list(Path(f"/proc/{player.proc.pid}/fd").iterdir()))
        # 16 held, not 200; a few more fds may open meanwhile (the KVM watch starts once QMP answers).
        assert fds_during - fds_before <= 16 + 8, (fds_before, fds_during)
        closed = sum(1 for conn in flood if _closed_by_peer(conn))
        assert closed >= 200 - 16
        player.trigger_end()
        player.finish()
    finally:
        for conn in flood:
            conn.close()
        player.cleanup()
    assert player.result.code == 3, player.result.stderr
    assert "refused console connections: too many open" in player.result.stderr


def test_env_file_planted_as_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    """The guest (uid 1000 owns the agent home) made .microvm-env a directory: every later start
    failed with a remedy about the agent home's permissions."""
    home = tmp_path / "home"
    (home / launcher.ENV_FILE / "x").mkdir(parents=True)
    plan_ = launcher.EnvFile(path=home / launcher.ENV_FILE, entries=(("ENABLE_CRI", "docker"),), owner=None)
    with pytest.raises(SupervisorError) as caught:
        launcher.write_env_file(plan_)
    assert caught.value.exit_code == ExitCode.CANT_CREATE
    assert f"{home / launcher.ENV_FILE} is a directory" in caught.value.message
    assert "rm -r" in caught.value.message


# ---- D10: a full disk ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path) -> None:
    with (directory / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:  # until ENOSPC
            filler.write(b"\0" * 4096)


def test_full_runtime_dir_disk_is_said_to_be_full(shared_tmp: Path) -> None:
    """A full disk under the runtime dir read as 'the instance dir was changed while the VM was
    starting (its permissions, or removed, or the disk is full)'; now it says the disk is full."""
    with _small_tmpfs(shared_tmp / "fs", "256k") as fs:
        case = fixed_case(builtin=True, qemu_behaviour="exit-at-once")
        player = _Player(case, shared_tmp / "case")
        (shared_tmp / "case").mkdir()
        player.runtime = fs / "rt"
        player.runtime.mkdir(mode=0o700)
        _fill(fs)
        result = player.play()
    assert result.code == ExitCode.CANT_CREATE, result.stderr
    assert re.search(rf"the disk holding {fs}/rt/\S+ is full \(\d+ bytes free\)", result.stderr), (
        result.stderr
    )
    assert not result.left_processes


@pytest.mark.vm
def test_guest_filling_the_disk_of_the_runtime_dir_keeps_its_exit_status(
    guest_assets: guest.GuestAssets, shared_tmp: Path
) -> None:
    """Work dir and runtime dir on one filesystem, which the guest fills: the status the guest wrote
    was lost (the status file could not grow) and the run ended with 76, 'QEMU exited before the
    guest reported a status'. The status no longer goes through the disk."""
    with _small_tmpfs(shared_tmp / "fs", "16m") as fs:
        work = fs / "work"
        work.mkdir()
        runtime_dir = fs / "rt"
        runtime_dir.mkdir(mode=0o700)
        args = ["run", "--name", "full", "--work-dir", str(work), "--agent-home", str(shared_tmp / "home")]
        script = "dd if=/dev/zero of=/work/big bs=1M count=32 2>/dev/null; exit 4"
        result = run_supervisor([*args, "--runtime-dir", str(runtime_dir), "--", "sh", "-c", script])
        assert result.returncode == 4, result.stderr
        assert list(runtime_dir.iterdir()) == []


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_ctrl_c_while_starting_prints_no_traceback(tmp_path: Path, how: str) -> None:
    """A SIGINT in the first ~0.1 s (while the CLI imports anyio, structlog, msgspec) printed a
    KeyboardInterrupt traceback through our modules."""
    script = Path(sys.executable).parent / "agentvm-supervise"
    argv = [str(script)] if how == "console-script" else supervisor_argv()
    seen: list[str] = []
    for step in range(16):
        proc = subprocess.Popen(
            [*argv, "list", "--runtime-dir", str(tmp_path / "none")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
        time.sleep(step * 0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        text = err.decode(errors="replace")
        seen.append(f"{step * 10} ms: {proc.returncode}")
        # CPython's own startup (site.py) or the generated wrapper's `import re` may be hit: not ours.
        ours = "Traceback" in text and re.search(r'File "[^"]*/supervisor/[^"]*\.py"', text) is not None
        assert not ours, f"after {step * 10} ms:\n{text}"
        assert proc.returncode in (0, 130, 1, -signal.SIGINT), text
    assert any(line.endswith(": 130") for line in seen), seen  # some signals did land while starting


# ---- the dev shell the host evaluates (DIRENV_ALLOW=1) --------------------------------------------


def test_guest_edited_nix_code_is_not_evaluated_on_the_host_until_allowed(
    guest_assets: guest.GuestAssets, tmp_path: Path, short_runtime: Path
) -> None:
    """With DIRENV_ALLOW=1 the host evaluated whatever flake.nix the guest (which owns /work) left,
    e.g. an impure devenv.nix reading the user's ssh key into the guest's environment."""
    bin_dir, log, _ = _stub_tools(tmp_path)
    work, home = tmp_path / "proj", tmp_path / "home"
    (work / "nix").mkdir(parents=True)
    (work / "flake.nix").write_text("{ outputs = _: { }; }\n")
    env = {"DIRENV_ALLOW": "1"}
    stderr = _launch(short_runtime, work, home, bin_dir, env)  # never allowed: not evaluated
    assert _calls(log) == [] and "is not evaluated" in stderr and "changed: flake.nix" in stderr
    allow_devshell(work, bin_dir)
    _launch(short_runtime, work, home, bin_dir, env)
    assert len(_calls(log)) == 1
    good = (home / ".microvm-devshell").read_text()
    # The guest rewrites the flake (and adds code it imports): the host leaves both alone.
    (work / "flake.nix").write_text("{ outputs = _: import ./nix/evil.nix; }\n")
    (work / "nix" / "evil.nix").write_text('builtins.readFile "/root/.ssh/id_ed25519"\n')
    stderr = _launch(short_runtime, work, home, bin_dir, env)
    assert len(_calls(log)) == 1, _calls(log)
    assert "changed: flake.nix, nix/evil.nix" in stderr
    assert (home / ".microvm-devshell").read_text() == good  # the VM starts with the previous one
    allow_devshell(work, bin_dir)  # the user reviewed it
    _launch(short_runtime, work, home, bin_dir, env)
    assert len(_calls(log)) == 2


def _group_members(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                found.append(int(entry.name))
    return found


def _zombie(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] in (b"Z", b"X")


def test_stop_signal_during_the_guest_build_kills_and_reaps_the_whole_build(tmp_path: Path) -> None:
    """The guest asset build (bash, apt-get, dpkg-deb) is a child like any other: a SIGTERM while it
    runs kills its whole process group, not just bash."""
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [*supervisor_argv(), "run", "--runtime-dir", str(tmp_path / "rt"), "--", "true"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=base_env({"AGENTVM_SUPERVISE_CACHE": str(cache)}),
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        build: list[int] = []
        while not build and time.monotonic() < deadline and proc.poll() is None:
            build = [pid for pid in _descendants(proc.pid) if "build-assets.sh" in _cmdline(pid)]
            time.sleep(0.02)
        assert build, "the build never started"
        time.sleep(0.5)  # let it start its own children (apt-get, ...)
        group = os.getpgid(build[0])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err.decode()
        # SIGKILLed grandchildren (apt-get, ...) are zombies until their new parent reaps them; one
        # still dying (its memory already gone, so an empty cmdline) takes a scheduling slot more.
        deadline = time.monotonic() + 10
        left = [pid for pid in _group_members(group) if not _zombie(pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [pid for pid in _group_members(group) if not _zombie(pid)]
        assert left == [], [_cmdline(pid) for pid in left]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
