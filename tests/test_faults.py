"""Fault injection: after any fault, nothing of the instance is left and the exit says why.

The fast mode (the default test command) plays 200 randomized cases with stub children
(tests/faults.py, tests/stubs/), a few at once; the seed is in pytest's header and in every failure.
The long mode is the same test with more cases: see the README, "Fault injection". The real-guest
cases below boot the built-in guest for a handful of the same faults.
"""

from __future__ import annotations

import collections
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from supervisor import guest
from tests.faults import FaultSettings, Player, check, make_case, report
from tests.support import user_ids


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
