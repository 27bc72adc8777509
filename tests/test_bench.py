"""`python -m bench --quick` as part of the suite, so the bench cannot rot unseen (issue 17): it
fails when a launcher fails or leaves something behind. Its figures are printed, never asserted
(timing belongs to the bench, not to tests)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from supervisor import guest
from tests.support import REPO, TEST_CACHE


def test_bench_quick_runs_every_launcher_and_leaves_nothing_behind(
    guest_assets: guest.GuestAssets, capsys: pytest.CaptureFixture[str]
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO,
        env={**os.environ, "AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    with capsys.disabled():
        print("\n" + result.stdout + result.stderr.rsplit("\n", 2)[-2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bench --quick: every launcher started and left nothing behind" in result.stderr
