"""`agentvm-supervise doctor`: every precondition of a VM start, its status and its remedy.

The checks are the ones `run` makes before it starts anything (`plan.build_plan` with a lenient
`checks.Preflight`), so the doctor and `run` can never disagree. The doctor creates nothing: it
does not build the built-in guest, create the runtime dir or start a VM.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Mapping
from pathlib import Path

import msgspec

from supervisor import checks, plan
from supervisor.checks import Check, Status
from supervisor.config import Config
from supervisor.errors import ExitCode, SupervisorError


class Report(msgspec.Struct, frozen=True, kw_only=True):
    can_start: bool  # no check failed
    accel: str | None  # the accelerator `run` would use
    accel_reason: str
    checks: list[Check]

    @property
    def exit_code(self) -> int:
        """0 when a VM can start; else the status `run` would stop with (the first failure's)."""
        for check in self.checks:
            if check.status is Status.FAIL:
                return check.exit_code or ExitCode.UNAVAILABLE
        return ExitCode.OK


def diagnose(config: Config, *, env: Mapping[str, str], cwd: Path) -> Report:
    preflight = checks.Preflight(strict=False)
    try:
        checked = plan.build_plan(config, env=env, cwd=cwd, command=None, preflight=preflight)
    except SupervisorError as exc:  # a bad input: the environment checks need a valid configuration
        preflight.checks.append(
            checks.fail(
                "config",
                exc.message,
                "fix the configuration; the other checks run once it is valid",
                exit_code=exc.exit_code,
            )
        )
        return Report(can_start=False, accel=None, accel_reason="", checks=preflight.checks)
    failed = bool(preflight.failures)
    return Report(
        can_start=not failed,
        accel=None if failed else checked.accel.value,
        accel_reason=checked.accel_reason,
        checks=preflight.checks,
    )


def render_json(report: Report) -> bytes:
    return msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n"


def render_table(report: Report, *, width: int | None = None) -> str:
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 140)
    name_width = max(len(check.name) for check in report.checks) + 2
    indent = " " * (name_width + 7)
    lines = [f"{'CHECK':<{name_width}}{'STATUS':<7}FINDING"]
    for check in report.checks:
        head = f"{check.name:<{name_width}}{check.status.value:<7}"
        lines += textwrap.wrap(
            check.summary, width, initial_indent=head, subsequent_indent=indent, break_on_hyphens=False
        )
        if check.remedy and check.status in (Status.FAIL, Status.WARN):
            lines += textwrap.wrap(
                f"remedy: {check.remedy}",
                width,
                initial_indent=indent,
                subsequent_indent=indent + "  ",
                break_on_hyphens=False,
            )
    failed = [check.name for check in report.checks if check.status is Status.FAIL]
    if failed:
        lines.append(f"A VM cannot start here: {len(failed)} check(s) failed ({', '.join(failed)}).")
    else:
        warned = sum(check.status is Status.WARN for check in report.checks)
        note = f"; {warned} warning(s) above" if warned else ""
        lines.append(f"A VM can start here (accelerator: {report.accel}{note}).")
    return "\n".join(lines) + "\n"
