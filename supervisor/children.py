"""Child processes: the only place that creates them.

Each child is the leader of its own session and process group, so terminal signals (Ctrl-C in the
user's pane) never reach it and the whole group (virtiofsd's sandbox child, a runner script's QEMU)
is signalled together. `run_child` is meant for `TaskGroup.start()`: it reports the started child,
watches its exit through a pidfd (no SIGCHLD handler, no polling) and, on any exit from its scope
(cancellation, an error, the leader's own exit), sends SIGTERM to the group, waits a grace period,
sends SIGKILL to the group and always reaps the leader. This is trio's `_posix_deliver_cancel` with
the group-kill that anyio's `Process.aclose()` lacks.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from supervisor.errors import ExitCode, SupervisorError
from supervisor.launcher import child_environment

_PR_SET_PDEATHSIG = 1
STDERR_TAIL_LINES = 20


@dataclass(frozen=True, kw_only=True)
class ChildSpec:
    name: str  # e.g. "virtiofsd[work]" or "runner": used in logs and errors
    argv: Sequence[str]
    pass_fds: Sequence[int] = ()
    stdin: int | None = None  # an fd (e.g. a PTY slave); None: /dev/null
    stdout: int | None = None  # an fd; None: merged into the logged stderr pipe
    stderr: int | None = None  # an fd; None: the logged stderr pipe
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    kill_grace: float = 2.0


@dataclass(eq=False)
class Child:
    spec: ChildSpec
    pid: int
    start_ticks: int  # /proc/PID/stat starttime: tells a recycled pid from ours
    started_at: float  # time.monotonic()
    status: int | None = None  # Popen.returncode convention: -N for signal N
    exited: anyio.Event = field(default_factory=anyio.Event)
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    cancel_scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stopped_by_us: bool = False  # it was still running when we signalled it to stop

    @property
    def name(self) -> str:
        return self.spec.name

    def signal_group(self, signum: int) -> None:
        """Signal the child's whole process group; a group that is already gone is not an error."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def stop(self) -> None:
        """Ask `run_child` to stop this child (TERM, grace, KILL); await `exited` for the end."""
        self.cancel_scope.cancel()

    def describe_status(self) -> str:
        return describe_status(self.status)

    def stderr_excerpt(self) -> str:
        lines = [line for line in self.stderr_tail if line.strip()]
        return " | ".join(lines[-5:])


def describe_status(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"status {status}"


def exit_code_of(status: int) -> int:
    """A Popen return code as a shell would report it: 128+N for signal N."""
    return ExitCode.SIGNAL_BASE + -status if status < 0 else status


def read_start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat: the process start time, stable for the life of the pid."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    return int(data[data.rindex(b")") + 2 :].split()[19])


def _make_preexec(parent_pid: int) -> Any:
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it

    def preexec() -> None:
        # If the supervisor dies, even by SIGKILL, the kernel kills this child. PDEATHSIG is tied to
        # the parent *thread*, so children are only ever spawned from the event-loop thread.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())

    return preexec


def _spawn(spec: ChildSpec, stderr_write: int) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(spec.argv),
            stdin=spec.stdin if spec.stdin is not None else subprocess.DEVNULL,
            stdout=spec.stdout if spec.stdout is not None else stderr_write,
            stderr=spec.stderr if spec.stderr is not None else stderr_write,
            pass_fds=tuple(spec.pass_fds),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            start_new_session=True,
            preexec_fn=_make_preexec(os.getpid()),  # noqa: PLW1509 - spawned from the loop thread only
            close_fds=True,
        )
    except FileNotFoundError:
        raise SupervisorError(
            f"{spec.name}: the program {spec.argv[0]} does not exist; install it or point the "
            "configuration at the right binary",
            exit_code=ExitCode.UNAVAILABLE,
        ) from None
    except PermissionError:
        raise SupervisorError(
            f"{spec.name}: the program {spec.argv[0]} is not executable by this user; fix its "
            "permissions (chmod +x) or point the configuration at another binary",
            exit_code=ExitCode.UNAVAILABLE,
        ) from None


async def _pump_stderr(child: Child, read_fd: int, log: structlog.typing.FilteringBoundLogger) -> None:
    """Turn the child's stderr into log events, line by line; ends at EOF (the whole group gone)."""
    pending = b""
    try:
        while True:
            await anyio.wait_readable(read_fd)
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                _log_line(child, raw, log)
    finally:
        if pending:
            _log_line(child, pending, log)


def _log_line(child: Child, raw: bytes, log: structlog.typing.FilteringBoundLogger) -> None:
    line = raw.decode("utf-8", "replace").rstrip("\r")
    child.stderr_tail.append(line)
    log.info("stderr", line=line)


def _has_exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


async def _wait_pidfd(pidfd: int, timeout: float | None) -> bool:
    with anyio.move_on_after(timeout):
        await anyio.wait_readable(pidfd)
        return True
    return False


async def run_child(
    spec: ChildSpec,
    *,
    on_start: Any = None,
    task_status: TaskStatus[Child] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run one child until it exits or this task is cancelled; see the module docstring.

    `on_start(child)` runs synchronously right after the fork (e.g. to register the group with the
    watchdog) before anything can cancel us; if it raises, the child is stopped and reaped like on
    any other error.
    """
    log = structlog.get_logger().bind(child=spec.name)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        proc = _spawn(spec, write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    os.set_blocking(read_fd, False)
    pidfd = os.pidfd_open(proc.pid)
    try:
        start_ticks = read_start_ticks(proc.pid)
    except (OSError, ValueError):
        start_ticks = 0  # already gone and reaped by nobody yet: the pidfd still tells its exit
    child = Child(spec=spec, pid=proc.pid, start_ticks=start_ticks, started_at=time.monotonic())
    log = log.bind(pid=proc.pid)
    try:
        if on_start is not None:
            on_start(child)  # first: the watchdog learns the group before anything else runs
        log.info("started", argv=" ".join(spec.argv))
        async with anyio.create_task_group() as pumps:
            pumps.start_soon(_pump_stderr, child, read_fd, log)
            task_status.started(child)
            with child.cancel_scope:
                await anyio.wait_readable(pidfd)
            if not _has_exited(pidfd):  # stopped on request: TERM, grace, KILL
                await _terminate(child, proc, pidfd, log)
            _reap(child, proc, log)
            # The leader is gone; anything left in its group (a forked helper) goes with it, so the
            # stderr pipe reaches EOF and the pump ends.
            child.signal_group(signal.SIGKILL)
    finally:
        with anyio.CancelScope(shield=True):
            if child.status is None:
                await _terminate(child, proc, pidfd, log)
                _reap(child, proc, log)
                child.signal_group(signal.SIGKILL)
            os.close(pidfd)
            os.close(read_fd)
            child.exited.set()


async def _terminate(
    child: Child, proc: subprocess.Popen[bytes], pidfd: int, log: structlog.typing.FilteringBoundLogger
) -> None:
    # A child that already died on its own (its exit not yet seen when we were cancelled) keeps
    # stopped_by_us False: its death may be the cause of the end, not a consequence of it.
    child.stopped_by_us = not _has_exited(pidfd)
    child.signal_group(signal.SIGTERM)
    if await _wait_pidfd(pidfd, child.spec.kill_grace):
        return
    log.warning("did not exit after SIGTERM; sending SIGKILL", grace_s=child.spec.kill_grace)
    child.signal_group(signal.SIGKILL)
    if not await _wait_pidfd(pidfd, 10.0):
        log.error("still alive 10 s after SIGKILL (uninterruptible sleep?)")


def _reap(child: Child, proc: subprocess.Popen[bytes], log: structlog.typing.FilteringBoundLogger) -> None:
    status = proc.poll()
    if status is None:  # not exited even after SIGKILL: reap blocking rather than leave a zombie
        status = proc.wait()
    child.status = status
    log.info("exited", status=describe_status(status))


# ---- short probes for the preflight checks (doctor, and `run` before anything starts) ----------


@dataclass(frozen=True)
class ProbeResult:
    status: int | None  # None: it could not be run, or was killed at its deadline
    output: str  # stdout and stderr, interleaved
    error: str | None = None  # why it could not be run


def probe(argv: Sequence[str], *, timeout: float = 10.0) -> ProbeResult:
    """Run a query to completion (`--version`, `-device help`) in its own process group.

    Synchronous on purpose: probes run before the event loop and before any child exists.
    """
    return probe_many([argv], timeout=timeout)[0]


def probe_many(argvs: Sequence[Sequence[str]], *, timeout: float = 10.0) -> list[ProbeResult]:
    """`probe` for several queries at once: all started, then each read to its end (the others
    run meanwhile; one that fills its pipe waits for its turn). One deadline for them all."""
    started: list[subprocess.Popen[bytes] | ProbeResult] = []
    try:
        for argv in argvs:
            try:
                started.append(
                    subprocess.Popen(
                        list(argv),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        env=child_environment(os.environ, {"LC_ALL": "C"}),  # stable, parseable help texts
                        start_new_session=True,
                        close_fds=True,
                    )
                )
            except OSError as exc:
                started.append(ProbeResult(None, "", exc.strerror or str(exc)))
        deadline = time.monotonic() + timeout
        return [_finish_probe(proc, deadline, timeout) for proc in started]
    finally:  # an exception (a stop signal) while they run: none is left running or unreaped
        for proc in started:
            if isinstance(proc, subprocess.Popen) and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()


def _finish_probe(
    proc: subprocess.Popen[bytes] | ProbeResult, deadline: float, timeout: float
) -> ProbeResult:
    if isinstance(proc, ProbeResult):
        return proc
    try:
        # A little time even past the deadline: a probe that has finished only needs reading.
        out, _ = proc.communicate(timeout=max(0.05, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return ProbeResult(None, out.decode(errors="replace"), f"no answer within {timeout:g} s")
    finally:
        if proc.returncode is None:
            # A stop signal during the preflight (StopRequested) or Ctrl-C: a probe is a child like
            # any other, killed with its group and reaped, not left to PID 1.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    return ProbeResult(proc.returncode, out.decode(errors="replace"))


def probe_unshare(steps: Sequence[int]) -> tuple[int, int]:
    """Call unshare(flags) for each of `steps` in a forked child, the way virtiofsd's sandbox does.

    Returns (-1, 0) when every step worked, else (index of the failing step, errno; errno 0 if the
    child died). Like the watchdog's fork, this runs before the event loop, while there are no threads.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        result = b"-1 0"
        for index, flags in enumerate(steps):
            if libc.unshare(flags) != 0:
                result = b"%d %d" % (index, ctypes.get_errno())
                break
        os.write(write_fd, result)
        os._exit(0)
    os.close(write_fd)
    try:
        data = os.read(read_fd, 64)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    if not data:
        return 0, 0
    step, err = data.split()
    return int(step), int(err)
