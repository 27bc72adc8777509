"""Fault injection: after any fault, nothing of the instance is left and the exit says why.

The fast mode (the default test command) plays 200 randomized cases with stub children
(tests/faults.py, tests/stubs/), a few at once; the seed is in pytest's header and in every failure.
The long mode is the same test with more cases: see the README, "Fault injection". The real-guest
cases below boot the built-in guest for a handful of the same faults.
"""

from __future__ import annotations

import collections
import os
import select
import shutil
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from supervisor import guest
from tests.faults import FaultSettings, Player, check, make_case, report
from tests.support import (
    base_env,
    instance_processes,
    leftovers,
    run_supervisor,
    shared_dir,
    start_supervisor,
    supervisor_argv,
    user_ids,
    wait_until_gone,
)


@pytest.fixture
def fault_root() -> Iterator[Path]:
    """Case dirs the test user can reach (pytest's tmp dirs are 0700 root)."""
    root = Path("/var/tmp") / f"agentvm-faults-{os.getpid()}"
    root.mkdir(mode=0o755, exist_ok=True)
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_randomized_faults_leave_nothing_behind(
    guest_assets: guest.GuestAssets, test_user: str, fault_root: Path, faults: FaultSettings
) -> None:
    ids = user_ids(test_user)
    cases = [make_case(faults.seed, index) for index in faults.indexes]

    def play(case_index: int) -> str | None:
        case = cases[case_index]
        result = Player(case, fault_root, ids).play()
        problems = check(case, result)
        return report(case, result, problems) if problems else None

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=faults.jobs) as pool:
        failures = [failure for failure in pool.map(play, range(len(cases))) if failure]
    kinds = collections.Counter(case.fault for case in cases)
    print(
        f"\n{len(cases)} fault cases (seed {faults.seed}) in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    )
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n\n" + "\n\n".join(failures)


# ---- the same faults with the real guest (QEMU under TCG, Debian's virtiofsd) ----------------


def _real_args(tmp: Path, name: str) -> list[str]:
    (tmp / "work").mkdir(exist_ok=True)
    return [
        "run", "--name", name, "--work-dir", str(tmp / "work"), "--agent-home", str(tmp / "home"),
        "--runtime-dir", str(tmp / "rt"), "--log-format", "human",
    ]  # fmt: skip


def _wait_for_pids(name: str, needle: str, count: int = 1, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid, cmdline in instance_processes(name) if needle in cmdline]
        if len(found) >= count:
            return found
        time.sleep(0.01)
    raise AssertionError(f"no {needle} of instance {name} within {timeout} s")


def _assert_nothing_left(name: str, tmp: Path) -> None:
    assert wait_until_gone(name) == []
    assert leftovers(tmp / "rt", timeout=10) == []  # the watchdog cleans up asynchronously


@pytest.mark.vm
def test_real_guest_virtiofsd_killed_while_the_guest_boots(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    sup = start_supervisor([*_real_args(tmp_path, "rf-boot"), "--", "sh", "-c", "sleep 600"])
    victims = _wait_for_pids("rf-boot", "--shared-dir=", count=3)
    victim = next(pid for pid in victims if shared_dir(pid) == str(tmp_path / "work"))
    os.kill(victim, signal.SIGKILL)
    code, _, stderr = sup.finish()
    assert code == 75, stderr
    assert "virtiofsd for share 'work'" in stderr and "SIGKILL" in stderr
    _assert_nothing_left("rf-boot", tmp_path)


@pytest.mark.vm
def test_real_guest_qemu_refusing_a_bad_argument(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[qemu]\nextra-args = ["-bogus-option"]\n')
    result = run_supervisor([*_real_args(tmp_path, "rf-arg"), "--config", str(config), "--", "true"])
    assert result.returncode == 76, result.stderr
    assert "-bogus-option" in result.stderr and "QEMU" in result.stderr
    _assert_nothing_left("rf-arg", tmp_path)


@pytest.mark.vm
def test_real_guest_virtiofsd_exiting_before_qemu_connects(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    # The real virtiofsd answers the preflight, then fails the way a real start failure does.
    dying = tmp_path / "virtiofsd"
    dying.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version|--help) exec {guest_assets.virtiofsd} "$1" ;; esac\n'
        "echo 'error: the shared dir vanished' >&2\nexit 1\n"
    )
    dying.chmod(0o755)
    result = run_supervisor([*_real_args(tmp_path, "rf-early"), "--virtiofsd", str(dying), "--", "true"])
    assert result.returncode == 75, result.stderr
    assert "virtiofsd for share '" in result.stderr and "the shared dir vanished" in result.stderr
    _assert_nothing_left("rf-early", tmp_path)


@pytest.mark.vm
def test_real_guest_share_dir_removed_mid_run(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    sup = start_supervisor(
        [*_real_args(tmp_path, "rf-rm"), "--", "sh", "-c", "echo GUEST-READY; sleep 2; ls /work; exit 4"]
    )
    sup.read_until(b"GUEST-READY")
    shutil.rmtree(tmp_path / "work")
    code, _, stderr = sup.finish()
    assert code == 4, stderr  # the guest still ran to its end and reported its status
    _assert_nothing_left("rf-rm", tmp_path)


@pytest.mark.vm
def test_real_guest_qemu_stopped_and_continued_then_sigterm(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    sup = start_supervisor(
        [*_real_args(tmp_path, "rf-stop"), "--", "sh", "-c", "echo GUEST-READY; sleep 600"]
    )
    sup.read_until(b"GUEST-READY")
    [qemu] = _wait_for_pids("rf-stop", "qemu-system")
    os.kill(qemu, signal.SIGSTOP)
    time.sleep(0.5)
    os.kill(qemu, signal.SIGCONT)
    sup.signal(signal.SIGTERM)
    code, _, stderr = sup.finish()
    assert code == 128 + signal.SIGTERM, stderr
    assert "stopping on signal" in stderr and "SIGTERM" in stderr
    _assert_nothing_left("rf-stop", tmp_path)


@pytest.mark.vm
def test_real_guest_supervisor_killed_during_the_graceful_stop(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    sup = start_supervisor([*_real_args(tmp_path, "rf-td"), "--", "sh", "-c", "echo GUEST-READY; sleep 600"])
    sup.read_until(b"GUEST-READY")
    sup.signal(signal.SIGTERM)  # system_powerdown: the guest is powering off ...
    time.sleep(0.2)
    sup.signal(signal.SIGKILL)  # ... when the supervisor dies: the watchdog must finish the job
    sup.finish()
    _assert_nothing_left("rf-td", tmp_path)


@pytest.mark.vm
def test_real_guest_supervisor_killed_on_a_terminal_restores_it(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    master, slave = os.openpty()
    saved = termios.tcgetattr(slave)
    try:
        proc = subprocess.Popen(
            [
                *supervisor_argv(),
                *_real_args(tmp_path, "rf-tty"),
                "--",
                "sh",
                "-c",
                "echo GUEST-READY; sleep 600",
            ],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=base_env(),
        )
        seen = b""
        deadline = time.monotonic() + 120
        while b"GUEST-READY" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        assert b"GUEST-READY" in seen
        assert termios.tcgetattr(slave) != saved  # the console put the terminal in raw mode
        proc.kill()
        proc.communicate(timeout=60)
        _assert_nothing_left("rf-tty", tmp_path)  # the watchdog is gone, so it has restored the tty
        assert termios.tcgetattr(slave) == saved
    finally:
        os.close(master)
        os.close(slave)
