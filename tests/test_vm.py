"""End to end: the real supervisor, real QEMU (TCG here), real virtiofsd, the built-in guest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from supervisor import guest
from tests.support import (
    instance_processes,
    leftovers,
    run_supervisor,
    shared_dir,
    start_supervisor,
    user_ids,
    wait_until_gone,
)

pytestmark = pytest.mark.vm


def _run_args(work: Path, home: Path, runtime: Path, name: str) -> list[str]:
    return [
        "run",
        "--name", name,
        "--work-dir", str(work),
        "--agent-home", str(home),
        "--runtime-dir", str(runtime),
    ]  # fmt: skip


def _assert_nothing_left(name: str, runtime: Path) -> None:
    assert wait_until_gone(name) == []
    assert leftovers(runtime, timeout=10) == []


def test_command_exit_status_and_file_owner_as_root(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    work, home, runtime = tmp_path / "work", tmp_path / "home", tmp_path / "rt"
    work.mkdir()
    script = (
        "echo hi > /work/f; id -u > /work/uid; "
        "grep ' virtiofs ' /proc/mounts | cut -d' ' -f1,2 | sort > /work/mounts; exit 7"
    )
    result = run_supervisor([*_run_args(work, home, runtime, "root-e2e"), "--", "sh", "-c", script])
    assert result.returncode == 7, result.stderr
    assert (work / "f").read_text() == "hi\n"
    assert (work / "uid").read_text() == "1000\n"  # the command ran as the guest's agent user
    assert (work / "mounts").read_text().split("\n")[:3] == [
        "agent-home /home/agent",
        "cri-storage /var/lib/containers",
        "work /work",
    ]
    info = (work / "f").stat()
    assert (info.st_uid, info.st_gid) == (os.getuid(), os.getgid())
    assert (home / "cri-storage").is_dir()
    _assert_nothing_left("root-e2e", runtime)


def test_command_exit_status_and_file_owner_as_unprivileged_user(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    uid, gid = user_ids(test_user)
    os.chown(shared_tmp, uid, gid)
    work = shared_tmp / "work"
    work.mkdir()
    os.chown(work, uid, gid)
    home = shared_tmp / "home"
    result = run_supervisor(
        ["run", "--name", "user-e2e", "--work-dir", str(work), "--agent-home", str(home), "--",
         "sh", "-c", "echo hi > /work/f; touch /home/agent/h /var/lib/containers/c; exit 7"],
        user=test_user,
        cwd=shared_tmp,
    )  # fmt: skip
    assert result.returncode == 7, result.stderr
    for path in (work / "f", home / "h", home / "cri-storage" / "c"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (uid, gid), path
    # The default runtime base of an unprivileged user without XDG_RUNTIME_DIR.
    _assert_nothing_left("user-e2e", Path(f"/tmp/agentvm-{uid}"))


def test_guest_command_output_reaches_stdout_unchanged(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    (tmp_path / "work").mkdir()
    sup = start_supervisor(
        [*_run_args(tmp_path / "work", tmp_path / "home", tmp_path / "rt", "stdout"), "--",
         "printf", "line one\\nline two\\n"]
    )  # fmt: skip
    code, stdout, stderr = sup.finish()
    assert code == 0, stderr
    assert stdout == b"line one\r\nline two\r\n"  # the guest tty's ONLCR, and nothing doubled


def test_socket_path_mode_boots_and_the_shares_work(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    result = run_supervisor(
        [*_run_args(tmp_path / "work", tmp_path / "home", tmp_path / "rt", "pathmode"),
         "--socket-mode", "path", "-v", "--", "sh", "-c", "echo via-path-mode > /work/f; exit 5"]
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert (tmp_path / "work" / "f").read_text() == "via-path-mode\n"
    ready = [json.loads(line) for line in result.stderr.splitlines() if '"share ready"' in line]
    assert sorted(event["share"] for event in ready) == ["agent-home", "cri-storage", "work"]
    _assert_nothing_left("pathmode", tmp_path / "rt")


# A guest command that a graceful stop hangs up (the power button, init.sh): its trap leaves the
# proof in /work.
GRACEFUL = "trap 'echo hung-up > /work/graceful; exit 0' HUP; echo GUEST-READY; while :; do sleep 1; done"


def _running(
    tmp_path: Path, name: str, *extra: str, command: str = "echo GUEST-READY; sleep 600"
) -> tuple[object, Path]:
    work, runtime = tmp_path / "work", tmp_path / "rt"
    work.mkdir()
    sup = start_supervisor(
        [*_run_args(work, tmp_path / "home", runtime, name), "-v", *extra, "--", "sh", "-c", command]
    )  # fmt: skip
    sup.read_until(b"GUEST-READY")
    return sup, runtime


def _pids(name: str, needle: str) -> list[int]:
    return [pid for pid, cmdline in instance_processes(name) if needle in cmdline]


def test_kill_9_of_a_virtiofsd_tears_everything_down_and_names_the_share(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    sup, runtime = _running(tmp_path, "kill-share")
    victims = [
        pid
        for pid in _pids("kill-share", "--shared-dir=")
        if (shared_dir(pid) or "").endswith("/home/cri-storage")
    ]
    assert victims
    os.kill(min(victims), signal.SIGKILL)  # the parent of the sandboxed pair
    code, _, stderr = sup.finish()  # type: ignore[attr-defined]
    assert code == 75, stderr
    assert "share 'cri-storage'" in stderr and "SIGKILL" in stderr
    _assert_nothing_left("kill-share", runtime)


def test_kill_9_of_the_runner_stops_every_virtiofsd(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    sup, runtime = _running(tmp_path, "kill-runner")
    [qemu] = _pids("kill-runner", "qemu-system")
    assert len(_pids("kill-runner", "--shared-dir=")) >= 3
    os.kill(qemu, signal.SIGKILL)
    code, _, stderr = sup.finish()  # type: ignore[attr-defined]
    assert code == 128 + signal.SIGKILL, stderr
    assert "killed by SIGKILL" in stderr
    _assert_nothing_left("kill-runner", runtime)


@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_sigterm_takes_the_graceful_path_then_tears_down(
    guest_assets: guest.GuestAssets, tmp_path: Path, machine: str
) -> None:
    sup, runtime = _running(tmp_path, "sigterm", "--machine", machine, command=GRACEFUL)
    sup.signal(signal.SIGTERM)  # type: ignore[attr-defined]
    code, _, stderr = sup.finish()  # type: ignore[attr-defined]
    assert code == 128 + signal.SIGTERM, stderr
    assert '"asked the guest to power off"' in stderr  # QMP system_powerdown came first
    # The built-in guest honours the power button: no need for the QMP quit fallback.
    assert "did not power off in time" not in stderr
    assert '"reason": "guest-shutdown"' in stderr
    assert (tmp_path / "work" / "graceful").read_text() == "hung-up\n"  # the guest's processes had their say
    _assert_nothing_left("sigterm", runtime)


def test_sigkill_of_the_supervisor_leaves_no_child_socket_or_dir(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    sup, runtime = _running(tmp_path, "sigkill")
    assert _pids("sigkill", "qemu-system") and len(_pids("sigkill", "--shared-dir=")) >= 3
    sup.signal(signal.SIGKILL)  # type: ignore[attr-defined]
    sup.finish()  # type: ignore[attr-defined]
    _assert_nothing_left("sigkill", runtime)


def test_next_start_cleans_up_after_a_dead_supervisor(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    """The watchdog normally cleans up; if it died too, the next start does."""
    runtime = tmp_path / "rt"
    stale = runtime / "stale-0000"
    stale.mkdir(parents=True, mode=0o700)
    runtime.chmod(0o700)
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    ticks = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    state = {
        "instance": "stale-0000",
        "supervisor_pid": 999_999_999,
        "supervisor_start_ticks": 1,
        "created": time.time(),
        "groups": [{"name": "virtiofsd[work]", "pgid": sleeper.pid, "start_ticks": ticks}],
    }
    (stale / "state.json").write_text(json.dumps(state))
    (stale / "work.sock").touch()
    (tmp_path / "work").mkdir()
    result = run_supervisor(
        [*_run_args(tmp_path / "work", tmp_path / "home", runtime, "after-stale"), "--", "true"]
    )
    assert result.returncode == 0, result.stderr
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    assert not stale.exists()
    _assert_nothing_left("after-stale", runtime)


def test_as_root_the_guest_user_maps_to_the_work_dir_owner(
    guest_assets: guest.GuestAssets, test_user: str, shared_tmp: Path
) -> None:
    """Container hosts run the supervisor as root: files must still belong to the project's owner."""
    uid, gid = user_ids(test_user)
    work, home = shared_tmp / "work", shared_tmp / "home"
    work.mkdir()
    os.chown(work, uid, gid)
    result = run_supervisor(
        [*_run_args(work, home, shared_tmp / "rt", "root-owner"), "--",
         "sh", "-c", "touch /work/f /home/agent/h; ls -ln /work/f"]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for path in (work / "f", home / "h"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path
    # The agent home the supervisor created as root belongs to the same owner.
    assert (home.stat().st_uid, home.stat().st_gid) == (uid, gid)
