from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor import guest
from supervisor.console import filter as termfilter
from tests.faults import (
    CASES_ENV,
    FAULT_SETTINGS,
    JOBS_ENV,
    SEED_ENV,
    FaultSettings,
    fault_settings,
)
from tests.support import (
    TEST_CACHE,
    TEST_USER,
    SubIds,
    Supervisor,
    start_supervisor,
    stop_leftover_supervisors,
)


@pytest.fixture(scope="session")
def guest_assets() -> guest.GuestAssets:
    """The built-in guest, built once into a world-readable cache the test user can read too."""
    TEST_CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    TEST_CACHE.chmod(0o755)
    return guest.ensure_assets({"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE)})


@pytest.fixture(scope="session")
def udp_echo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guest_tools/udp_echo.c, linked static: a UDP server the built-in guest can run from /work
    (its busybox has none)."""
    out = tmp_path_factory.mktemp("guest-tools") / "udp-echo"
    source = Path(__file__).parent / "guest_tools" / "udp_echo.c"
    subprocess.run([os.environ.get("CC", "gcc"), "-static", "-O2", "-o", str(out), str(source)], check=True)
    return out


@pytest.fixture(
    scope="session",  # not per function: hypothesis's @given tests take it too
    params=[
        pytest.param(
            termfilter.C_SAFE_RUN_END,
            id="c-scan",
            marks=pytest.mark.skipif(
                not termfilter.FAST_SCAN, reason="supervisor/console/_scan.c is not built"
            ),
        ),
        pytest.param(termfilter.safe_run_end_re, id="re-scan"),
    ],
)
def scan(request: pytest.FixtureRequest) -> termfilter.SafeRunEnd:
    """Each implementation of the filter's fast path: supervisor/console/_scan.c, and the regex it replaces."""
    implementation: termfilter.SafeRunEnd = request.param
    return implementation


@pytest.fixture(scope="session")
def test_user() -> Iterator[str]:
    """An unprivileged user made for the tests (CI runs as root), removed afterwards."""
    created = False
    if subprocess.run(["id", TEST_USER], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
        created = True
    yield TEST_USER
    if created:
        subprocess.run(["userdel", "--remove", TEST_USER], capture_output=True, check=False)


@pytest.fixture
def subids() -> Iterator[SubIds]:
    """Give users /etc/subuid|subgid ranges for this test only (a new machine has none)."""
    given = SubIds()
    yield given
    given.take_back()


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Iterator[Path]:
    """A temp dir reachable by the test user (pytest's own tmp dirs are 0700 root)."""
    path = Path("/var/tmp") / f"agentvm-t-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def short_runtime() -> Iterator[Path]:
    """A runtime base short enough for unix socket paths under long instance names (sun_path)."""
    path = Path(tempfile.mkdtemp(prefix="avr-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def launch() -> Iterator[Callable[..., Supervisor]]:
    """start_supervisor, with a supervisor a failed test left running SIGKILLed (its watchdog then
    tears the instance down), so one failure does not leak VMs into the next test."""
    started: list[Supervisor] = []

    def start(*args: Any, **kwargs: Any) -> Supervisor:
        sup = start_supervisor(*args, **kwargs)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        if sup.proc.poll() is None:
            sup.proc.kill()
        sup.proc.communicate(timeout=30)  # and its pipes closed, also when it had exited


# ---- the fault-injection suite's knobs (tests/test_faults.py, README "Fault injection") --------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("faults", "fault injection (tests/test_faults.py)")
    group.addoption("--fault-seed", type=int, help=f"seed of the randomized cases (env {SEED_ENV})")
    group.addoption("--fault-cases", type=int, help=f"number of cases (env {CASES_ENV}; default 200)")
    group.addoption("--fault-jobs", type=int, help=f"cases played at once (env {JOBS_ENV}; default 4)")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[FAULT_SETTINGS] = fault_settings(
        seed=config.getoption("--fault-seed"),
        cases=config.getoption("--fault-cases"),
        jobs=config.getoption("--fault-jobs"),
        env=os.environ,
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that boots the real guest builds it first, through the session fixture: a new machine
    has no asset cache, and a build inside one test's supervisor would count against its timeout."""
    for item in items:
        names = getattr(item, "fixturenames", None)
        if item.get_closest_marker("vm") is not None and names is not None and "guest_assets" not in names:
            names.insert(0, "guest_assets")


def pytest_report_header(config: pytest.Config) -> str:
    settings = config.stash[FAULT_SETTINGS]
    return (
        f"fault injection: seed {settings.seed}, {settings.count} cases, {settings.jobs} at once "
        f"(repeat with {SEED_ENV}={settings.seed})"
    )


@pytest.fixture(scope="session")
def faults(request: pytest.FixtureRequest) -> FaultSettings:
    return request.config.stash[FAULT_SETTINGS]


@pytest.fixture(autouse=True)
def _no_supervisor_outlives_its_test() -> Iterator[None]:
    yield
    stop_leftover_supervisors()
