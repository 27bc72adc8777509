"""An instance's lifecycle: one phase, the events that move it, and the exit status they decide.

    STARTING --VM started--> RUNNING --stop requested / VM exited--> STOPPING --ended--> STOPPED
        `----------------stop requested / start failed---------------^

A stop is requested four ways (a stop signal, `stop` on the control socket, the console's escape
key, the terminal hanging up), all through `begin_stop`, which records the request, keeps the
first cause (what `status` and the service manager are told) and answers what to do: cancel
everything (nothing is running yet), ask the guest to power off, or stop the VM now (a second
signal). The exit status is `exit_status`, a pure function of what was recorded, how the VM
process ended and what the guest reported (the README's exit-status table, row by row).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from supervisor.children import describe_status, exit_code_of
from supervisor.errors import ExitCode, SupervisorError
from supervisor.statusport import GuestReport


class Phase(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


# Which phase may follow which: every move goes through `_move`, which enforces this.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.STOPPING}),
    Phase.RUNNING: frozenset({Phase.STOPPING}),
    Phase.STOPPING: frozenset({Phase.STOPPED}),
    Phase.STOPPED: frozenset(),
}


class Request(enum.Enum):
    """The four ways to ask an instance to stop."""

    SIGNAL = "signal"
    CONTROL = "control"  # `agentvm-supervise stop`: exits as if by SIGTERM
    CONSOLE_KEY = "console key"
    HANGUP = "hangup"  # the user's terminal went away: what SIGHUP does, with or without one


@dataclass(frozen=True)
class Cause:
    request: Request
    signum: int | None = None  # Request.SIGNAL
    deadline: float | None = None  # Request.CONTROL: the guest's time to power off (None: the plan's)

    @classmethod
    def signal(cls, signum: int) -> Cause:
        return cls(Request.SIGNAL, signum=signum)

    @classmethod
    def control(cls, deadline: float | None) -> Cause:
        return cls(Request.CONTROL, deadline=deadline)


class Action(enum.Enum):
    """What the instance does about a stop request."""

    NOTHING = "nothing"  # already under way
    CANCEL_ALL = "cancel all"  # still starting: nothing to power off
    GRACEFUL = "graceful"  # ask the guest to power off, with a deadline
    FORCE = "force"  # a second signal: no more patience


@dataclass(frozen=True)
class Record:
    """What ended the instance, each way's first word; `exit_status` reads it."""

    signal: int | None = None  # a stop signal, or SIGHUP for a terminal that hung up
    by_control: bool = False
    by_console: bool = False
    error: SupervisorError | None = None  # the supervisor could not do its job (the first such)


class Lifecycle:
    """The phase and the record of one instance; the only place either changes."""

    def __init__(self, *, on_stopping: Callable[[str], None], log: Any) -> None:
        self.phase = Phase.STARTING
        self.cause: str | None = None  # the first cause, as `status` shows it
        self.record = Record()
        self.deadline: float | None = None  # a control stop's own graceful deadline
        self._on_stopping = on_stopping
        self._log = log
        self._vm_started = False  # a stop that came while starting leaves the phase at STOPPING

    def vm_started(self) -> None:
        self._vm_started = True
        if self.phase is Phase.STARTING:  # a stop may have come first: it stands
            self._move(Phase.RUNNING)

    def begin_stop(self, cause: Cause) -> Action:
        """Record a stop request; the answer is what the caller must do about it."""
        record = self.record
        no_vm = not self._vm_started
        if cause.request is Request.SIGNAL:
            assert cause.signum is not None
            if cause.signum == signal.SIGHUP and record.signal == signal.SIGHUP:
                return Action.NOTHING  # the same hangup again: the kernel and the shell both send it
            repeated = record.signal is not None
            if not repeated:
                name = signal.Signals(cause.signum).name
                self.record = replace(record, signal=cause.signum)
                self._log.warning("stopping on signal", signal=name)
                self._stopping(f"signal {name}")
            elif not no_vm:
                self._log.warning("second signal: stopping now")
                return Action.FORCE
        elif cause.request is Request.CONTROL:
            if self.cause is not None:
                return Action.NOTHING  # already stopping; the first stop's deadline stands
            self.record = replace(record, by_control=True)
            self.deadline = cause.deadline
            self._stopping("stop requested on the control socket")
        elif cause.request is Request.CONSOLE_KEY:
            self.record = replace(record, by_console=True)
            self._stopping("the console's stop key")
        elif record.signal is None:  # Request.HANGUP
            self.record = replace(record, signal=signal.SIGHUP)
            self._log.warning("the terminal hung up; stopping the VM")
            self._stopping("the terminal hung up")
        return Action.CANCEL_ALL if no_vm else Action.GRACEFUL

    def fail(self, error: SupervisorError) -> None:
        """The supervisor could not do its job; a stop already requested keeps its status."""
        record = self.record
        if record.error is None and record.signal is None and not record.by_control:
            self.record = replace(record, error=error)

    def vm_exited(self, status: str) -> None:
        self._stopping("a share failed" if self.record.error is not None else f"the VM exited ({status})")

    def ended(self) -> None:
        self._stopping("the instance ended")
        self._move(Phase.STOPPED)

    def _stopping(self, cause: str) -> None:
        """Teardown begins: the first cause is kept, and the service manager hears of it."""
        if self.cause is None:
            self.cause = cause
            self._on_stopping(cause)
        if self.phase in (Phase.STARTING, Phase.RUNNING):
            self._move(Phase.STOPPING)

    def _move(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise AssertionError(f"the instance cannot go from {self.phase} to {phase}")
        self.phase = phase


# ---- the exit status -------------------------------------------------------------------------


@dataclass(frozen=True)
class VmEnd:
    """How the VM process ended."""

    pid: int
    status: int  # a Popen return code: negative for a signal
    said: str  # the end of its stderr


@dataclass(frozen=True)
class Verdict:
    """The exit status, and what `run` says with it."""

    code: int
    error: SupervisorError | None = None  # raised: its paragraph is printed, its code returned
    notice: str | None = None  # printed to stderr before exiting with `code`
    vm_failed: bool = False  # a custom runner's failure: logged with its own words


def exit_status(
    record: Record,
    vm: VmEnd | None,
    report: GuestReport,
    *,
    builtin_guest: bool,
    failed_share: SupervisorError | None = None,
) -> Verdict:
    """The exit status of `run`, in the README's order of precedence (see its table).

    `vm` is None when the VM process never ran (or was never reaped); `failed_share` names a
    virtiofsd that died on its own, the likely cause of a VM process that failed.
    """
    if record.signal is not None:
        return Verdict(ExitCode.SIGNAL_BASE + record.signal)
    if record.by_control:
        return Verdict(ExitCode.SIGNAL_BASE + signal.SIGTERM)
    if record.error is not None:
        return _failed(record.error)
    if record.by_console:
        # Like a stop signal: what the command returned when it was hung up is not its verdict.
        return Verdict(ExitCode.STOPPED_FROM_CONSOLE)
    if vm is not None and vm.status != 0 and report.exit_status is None and failed_share is not None:
        return _failed(failed_share)
    if vm is None:
        return _failed(SupervisorError("the runner never started", exit_code=ExitCode.INTERNAL))
    if not builtin_guest:
        return Verdict(exit_code_of(vm.status), vm_failed=vm.status != 0)
    problem = report.problem()
    if problem is not None:
        return _failed(
            SupervisorError(
                f"{problem}. The guest cannot be trusted: run with --verbose to see its console.",
                exit_code=ExitCode.GUEST_FAILED,
            )
        )
    if report.error is not None:
        return _failed(
            SupervisorError(
                f"the built-in guest failed before running the command: {report.error}. Run with "
                "--verbose to see the guest console and the virtiofsd logs.",
                exit_code=ExitCode.GUEST_FAILED,
            )
        )
    if report.exit_status is not None:
        return Verdict(report.exit_status)
    if vm.status < 0:
        return Verdict(
            exit_code_of(vm.status),
            notice=f"agentvm-supervise: QEMU (pid {vm.pid}) was {describe_status(vm.status)} before "
            "the guest reported a status; nothing is left running.",
        )
    overflow = report.overflow()
    if overflow is not None:
        return _failed(
            SupervisorError(
                f"{overflow}. Run with --verbose to see its console.", exit_code=ExitCode.GUEST_FAILED
            )
        )
    said = f" QEMU said: {vm.said}." if vm.said else ""
    return _failed(
        SupervisorError(
            f"QEMU (pid {vm.pid}) exited with {describe_status(vm.status)} before the guest "
            f"reported a status.{said} Check the QEMU command line with --debug.",
            exit_code=ExitCode.RUNNER_FAILED,
        )
    )


def _failed(error: SupervisorError) -> Verdict:
    return Verdict(error.exit_code, error=error)
