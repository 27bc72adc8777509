"""Regression tests for the defects of issue 11 (an adversarial pass), one per defect, named after it.

They run the real supervisor with the stub children of the fault suite (tests/stubs/), steered to act
as a hostile guest would, and look at what a user would see: the exit status, the message, the disk,
the processes and their environments.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from supervisor import statusport
from tests.faults import Case, Player, check, fixed_case, report


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
    ["agentvm-exit-status=256", "agentvm-exit-status=\u00b2", "agentvm-exit-status=-1", "agentvm-exit-status=1e3"],
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
