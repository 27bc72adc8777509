"""The exit status of `run`, row by row of the README's table (lifecycle.exit_status is pure).

Every row of README.md "## Exit status" is here; the codes the supervisor raises while planning
(64, 66, 69, 73) reach the table the same way any recorded error does, so one row each checks
that the error's own code is the status.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import NamedTuple

import pytest

from supervisor import lifecycle
from supervisor.errors import ExitCode, SupervisorError
from supervisor.lifecycle import Action, Cause, Lifecycle, Phase, Record, Request, VmEnd, exit_status
from supervisor.statusport import GuestReport

NO_REPORT = GuestReport(None, None)
SHARE_DIED = SupervisorError("virtiofsd for share 'work' exited", exit_code=ExitCode.SHARE_FAILED)


def _error(code: ExitCode) -> SupervisorError:
    return SupervisorError(f"failed with {code.name}", exit_code=code)


class Row(NamedTuple):
    row: str  # the README table's first column
    record: Record
    vm: VmEnd | None
    report: GuestReport
    builtin: bool
    failed_share: SupervisorError | None
    status: int
    raises: bool


ROWS = [
    Row("CMD's status", Record(), VmEnd(1, 0, ""), GuestReport(0, None), True, None, 0, False),
    Row("CMD's status", Record(), VmEnd(1, 0, ""), GuestReport(3, None), True, None, 3, False),
    Row("CMD's status", Record(), VmEnd(1, 0, ""), GuestReport(255, None), True, None, 255, False),
    Row("runner's status", Record(), VmEnd(1, 0, ""), NO_REPORT, False, None, 0, False),
    Row("runner's status", Record(), VmEnd(1, 5, "boom"), NO_REPORT, False, None, 5, False),
    Row("runner's status", Record(), VmEnd(1, -signal.SIGKILL, ""), NO_REPORT, False, None, 137, False),
    Row("64", Record(error=_error(ExitCode.USAGE)), None, NO_REPORT, True, None, 64, True),
    Row("66", Record(error=_error(ExitCode.NO_INPUT)), None, NO_REPORT, True, None, 66, True),
    Row("69", Record(error=_error(ExitCode.UNAVAILABLE)), None, NO_REPORT, True, None, 69, True),
    Row("70", Record(), None, NO_REPORT, True, None, 70, True),
    Row("73", Record(error=_error(ExitCode.CANT_CREATE)), None, NO_REPORT, True, None, 73, True),
    Row("75", Record(error=SHARE_DIED), VmEnd(1, 1, ""), NO_REPORT, True, None, 75, True),
    # the share's watcher lost the race to the VM's exit
    Row("75", Record(), VmEnd(1, 1, ""), NO_REPORT, True, SHARE_DIED, 75, True),
    Row("75", Record(), VmEnd(1, 1, ""), NO_REPORT, False, SHARE_DIED, 75, True),
    Row("76", Record(), VmEnd(1, 1, "qemu: bad option"), NO_REPORT, True, None, 76, True),
    Row("77", Record(), VmEnd(1, 0, ""), GuestReport(None, "mount /work failed"), True, None, 77, True),
    Row("77", Record(), VmEnd(1, 0, ""), GuestReport(invalid="256"), True, None, 77, True),  # a bad status
    Row("77", Record(), VmEnd(1, 1, ""), GuestReport(dropped=1 << 20), True, None, 77, True),  # a flood
    Row("130", Record(by_console=True), VmEnd(1, 0, ""), GuestReport(0, None), True, None, 130, False),
    Row("130", Record(by_console=True), VmEnd(1, 0, ""), NO_REPORT, False, None, 130, False),
    Row(
        "128+N", Record(signal=signal.SIGTERM), VmEnd(1, 0, ""), GuestReport(0, None), True, None, 143, False
    ),
    Row("128+N", Record(signal=signal.SIGINT), VmEnd(1, 0, ""), NO_REPORT, False, None, 130, False),
    Row(
        "128+N",
        Record(signal=signal.SIGHUP),
        None,
        NO_REPORT,
        True,
        None,
        129,
        False,
    ),  # stopped while starting
    Row("128+N", Record(), VmEnd(1, -signal.SIGKILL, ""), NO_REPORT, True, None, 137, False),  # QEMU killed
    Row("143", Record(by_control=True), VmEnd(1, 0, ""), GuestReport(0, None), True, None, 143, False),
    Row("143", Record(by_control=True), None, NO_REPORT, True, None, 143, False),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.row}-{index}" for index, row in enumerate(ROWS)])
def test_the_exit_status_table(row: Row) -> None:
    verdict = exit_status(
        row.record, row.vm, row.report, builtin_guest=row.builtin, failed_share=row.failed_share
    )
    assert verdict.code == row.status
    assert (verdict.error is not None) == row.raises
    if verdict.error is not None:
        assert verdict.error.exit_code == row.status  # raised errors exit with their own code


def test_every_row_of_the_readme_table_is_covered() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Exit status", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1) for m in re.finditer(r"^\| ([^|]+?) \|", section, re.MULTILINE)} - {"status", "---"}
    assert rows == {row.row for row in ROWS}


def test_precedence_a_signal_beats_what_followed_it() -> None:
    """The stop request names the status; what the command or QEMU did afterwards does not."""
    killed = exit_status(
        Record(signal=signal.SIGTERM, by_console=True),
        VmEnd(1, 1, ""),
        GuestReport(None, "x"),
        builtin_guest=True,
    )
    assert killed.code == 143 and killed.error is None
    # A stop requested first keeps its status even when a share fails during the stop.
    assert (
        exit_status(Record(by_control=True, error=SHARE_DIED), None, NO_REPORT, builtin_guest=True).code
        == 143
    )
    # An error beats the console key (the key came after the failure began the stop).
    assert (
        exit_status(Record(by_console=True, error=SHARE_DIED), None, NO_REPORT, builtin_guest=True).code == 75
    )


def test_a_vm_killed_before_the_guest_reported_is_said_on_stderr() -> None:
    verdict = exit_status(Record(), VmEnd(42, -signal.SIGKILL, ""), NO_REPORT, builtin_guest=True)
    assert (
        verdict.code == 137
        and verdict.notice is not None
        and "QEMU (pid 42) was killed by SIGKILL" in verdict.notice
    )


def test_qemu_words_go_into_the_runner_failed_paragraph() -> None:
    verdict = exit_status(Record(), VmEnd(7, 1, "could not open kernel"), NO_REPORT, builtin_guest=True)
    assert verdict.error is not None and "QEMU said: could not open kernel." in verdict.error.message


# ---- the lifecycle's phases and stop requests ----------------------------------------------------


def _lifecycle() -> tuple[Lifecycle, list[str]]:
    told: list[str] = []

    class _Log:
        def warning(self, event: str, **_: object) -> None:
            pass

    return Lifecycle(on_stopping=told.append, log=_Log()), told


def _phase(life: Lifecycle) -> Phase:
    return life.phase  # read afresh: each call may have moved it


def test_a_stop_while_starting_cancels_everything_and_keeps_the_first_cause() -> None:
    life, told = _lifecycle()
    assert life.begin_stop(Cause.control(5.0)) is Action.CANCEL_ALL
    assert _phase(life) is Phase.STOPPING and life.deadline == 5.0
    assert life.begin_stop(Cause.control(1.0)) is Action.NOTHING  # the first stop's deadline stands
    assert life.begin_stop(Cause.signal(signal.SIGTERM)) is Action.CANCEL_ALL
    life.vm_started()  # the VM came up before the cancellation landed: the stop stands
    assert _phase(life) is Phase.STOPPING and life.deadline == 5.0
    life.ended()
    assert _phase(life) is Phase.STOPPED
    assert told == ["stop requested on the control socket"]
    assert life.record == Record(signal=signal.SIGTERM, by_control=True)


def test_the_four_stop_paths_while_running() -> None:
    for cause, first in (
        (Cause.signal(signal.SIGINT), "signal SIGINT"),
        (Cause.control(None), "stop requested on the control socket"),
        (Cause(Request.CONSOLE_KEY), "the console's stop key"),
        (Cause(Request.HANGUP), "the terminal hung up"),
    ):
        life, told = _lifecycle()
        life.vm_started()
        assert _phase(life) is Phase.RUNNING
        assert life.begin_stop(cause) is Action.GRACEFUL
        assert _phase(life) is Phase.STOPPING and life.cause == first and told == [first]


def test_a_second_signal_stops_the_vm_now_and_a_repeated_hangup_is_ignored() -> None:
    life, _ = _lifecycle()
    life.vm_started()
    assert life.begin_stop(Cause.signal(signal.SIGHUP)) is Action.GRACEFUL
    assert life.begin_stop(Cause.signal(signal.SIGHUP)) is Action.NOTHING
    assert life.begin_stop(Cause(Request.HANGUP)) is Action.GRACEFUL  # the record keeps SIGHUP
    assert life.begin_stop(Cause.signal(signal.SIGTERM)) is Action.FORCE
    assert life.record.signal == signal.SIGHUP


def test_the_vm_exiting_is_a_cause_and_a_failure_names_the_share() -> None:
    life, told = _lifecycle()
    life.vm_started()
    life.fail(SHARE_DIED)
    life.vm_exited("exit status 1")
    assert told == ["a share failed"]
    life.fail(_error(ExitCode.INTERNAL))  # the first error stays
    assert life.record.error is SHARE_DIED


def test_the_transition_table_has_no_way_back() -> None:
    for phase, after in lifecycle.TRANSITIONS.items():
        assert phase not in after
    assert lifecycle.TRANSITIONS[Phase.STOPPED] == frozenset()
