from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import guest
from tests.support import TEST_CACHE, TEST_USER


@pytest.fixture(scope="session")
def guest_assets() -> guest.GuestAssets:
    """The built-in guest, built once into a world-readable cache the test user can read too."""
    TEST_CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    TEST_CACHE.chmod(0o755)
    return guest.ensure_assets({"AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE)})


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
def shared_tmp(tmp_path: Path) -> Iterator[Path]:
    """A temp dir reachable by the test user (pytest's own tmp dirs are 0700 root)."""
    path = Path("/var/tmp") / f"agentvm-t-{os.getpid()}-{tmp_path.name}"
    path.mkdir(mode=0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
