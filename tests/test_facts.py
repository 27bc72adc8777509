"""Facts about binaries and namespaces, kept in the state dir (issue 17): a second start runs no
probe; a new binary at the same path is probed afresh; doctor never writes the cache; a namespace
success is never served to a process a seccomp filter could be refusing unshare to."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from supervisor import guest
from supervisor.qemu import SANDBOX
from tests.container_support import FAKE_QEMU, Launched, fake_runner_config
from tests.support import run_supervisor, supervisor_argv

DENY_UNSHARE = [sys.executable, "-m", "tests.deny_unshare"]


def _logging_wrapper(path: Path, target: str, log: Path, extra: str = "") -> None:
    """A binary that logs each command line it gets, then runs `target` with it."""
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\n{extra}exec {target} "$@"\n')
    path.chmod(0o755)


def _setup(tmp_path: Path, assets: guest.GuestAssets) -> tuple[Path, Path, dict[str, str]]:
    config = fake_runner_config(tmp_path, "facts")
    log = tmp_path / "calls"
    _logging_wrapper(tmp_path / "qemu", f"{sys.executable} {FAKE_QEMU}", log)
    _logging_wrapper(tmp_path / "virtiofsd", str(assets.virtiofsd), log)
    config.write_text(
        config.read_text().replace(str(tmp_path / "fake-qemu"), str(tmp_path / "qemu"))
        + f'[virtiofsd]\nbinary = "{tmp_path / "virtiofsd"}"\n'
    )
    return config, log, {"XDG_STATE_HOME": str(tmp_path / "state")}


def _start_and_stop(config: Path, tmp_path: Path, env: dict[str, str]) -> None:
    sup = Launched([*supervisor_argv(), "run", "--config", str(config)], tmp_path, env=env)
    try:
        sup.read_until(b"RUNNER-UP")
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait() == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()


SANDBOX_PROBE = f"-sandbox {SANDBOX} -machine none -device help"  # checks.check_qemu_sandbox


def _probes(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [call for call in calls if call in ("-version", "--version", "--help") or call.endswith(" help")]


def test_a_second_start_runs_no_probe_and_a_new_binary_is_probed_again(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    config, log, env = _setup(tmp_path, guest_assets)
    _start_and_stop(config, tmp_path, env)
    assert sorted(_probes(log)) == sorted(
        [
            "-version",
            "-machine help",
            "-device help",
            "-object help",
            "-accel help",
            "--version",
            "--help",
            SANDBOX_PROBE,
        ]
    )
    _start_and_stop(config, tmp_path, env)
    assert _probes(log) == []  # every answer came from the state dir
    # The same path, another binary (an upgrade): its answers are not the old one's.
    _logging_wrapper(tmp_path / "qemu", f"{sys.executable} {FAKE_QEMU}", log, extra=": upgraded\n")
    _start_and_stop(config, tmp_path, env)
    assert sorted(_probes(log)) == sorted(
        ["-accel help", "-device help", "-machine help", "-object help", "-version", SANDBOX_PROBE]
    )


def test_doctor_reads_the_cache_but_never_writes_it(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    config, log, env = _setup(tmp_path, guest_assets)
    for _ in range(2):
        result = run_supervisor(["doctor", "--json", "--config", str(config)], env=env)
        assert json.loads(result.stdout)["can_start"] is True, result.stdout
        assert len(_probes(log)) == 8  # nothing kept: probed each time
    assert not (tmp_path / "state").exists()
    _start_and_stop(config, tmp_path, env)
    _probes(log)
    result = run_supervisor(["doctor", "--json", "--config", str(config)], env=env)
    assert json.loads(result.stdout)["can_start"] is True and _probes(log) == []


def test_a_namespace_success_is_not_served_under_a_seccomp_filter(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    config, _, env = _setup(tmp_path, guest_assets)
    _start_and_stop(config, tmp_path, env)  # stores this boot's namespace success
    assert [path.name[:3] for path in (tmp_path / "state" / "agentvm-supervise" / "facts").iterdir()].count(
        "ns-"
    ) == 1
    result = run_supervisor(["doctor", "--json", "--config", str(config)], env=env)
    assert {c["name"]: c["status"] for c in json.loads(result.stdout)["checks"]}["namespaces"] == "ok"
    denied = Launched(
        [*DENY_UNSHARE, *supervisor_argv(), "doctor", "--json", "--config", str(config)], tmp_path, env=env
    )
    assert denied.wait() == 69, denied.stderr()
    checks = {c["name"]: c for c in json.loads(denied.output)["checks"]}
    assert checks["namespaces"]["status"] == "fail" and "EPERM" in checks["namespaces"]["summary"]
