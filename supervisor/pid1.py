"""PID-1 duty for container hosts: stop signals from the first instant, and reaping adopted orphans.

In a container the supervisor is often PID 1 of its PID namespace. Two kernel rules matter then:

- A signal whose disposition is SIG_DFL is never delivered to a namespace's init (only SIGKILL and
  SIGSTOP from an ancestor namespace are). SIGTERM from `docker stop` would be silently dropped
  until a handler exists, so `StopSignals` installs one at the very start of `main`, long before
  the event loop (building the guest may take seconds).
- Every process orphaned inside the namespace is re-parented to init, which must reap it or it
  stays a zombie forever. Outside a container, `--subreaper` (PR_SET_CHILD_SUBREAPER) makes the
  supervisor the reaper of its own orphaned descendants in the same way.

`reap_orphans` reaps those orphans without stealing the children that children.run_child owns
(it reaps each of its own through Popen, and must get the real status). See its docstring for
the race and why it cannot happen.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable
from types import FrameType

_PR_SET_CHILD_SUBREAPER = 36
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# While one of our own children is a zombie it hides the others from waitid(P_ALL) (see below);
# children.py reaps it within a loop iteration, so look again this soon.
OWN_ZOMBIE_RECHECK_S = 0.02


class StopRequested(BaseException):  # like KeyboardInterrupt: not an error
    """A stop signal arrived before the event loop took over the signals."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Handlers for SIGINT/SIGTERM/SIGHUP from the start of the process to its end.

    Before the event loop they raise StopRequested, so `main` unwinds and exits 128+N with nothing
    left behind. Once `defer()` is called (just before the loop) they only record the signal: the
    loop's own signal receiver takes over and first handles what `take()` returns. The loop puts
    SIG_DFL back when its receiver closes, so `defer()` is called again after the loop, for PID 1.
    """

    def __init__(self) -> None:
        self._pending: list[int] = []
        self._raise = True

    def install(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def defer(self) -> None:
        self._raise = False
        self.install()

    def take(self) -> list[int]:
        taken, self._pending = self._pending, []
        return taken

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._raise:
            raise StopRequested(signum)
        self._pending.append(signum)


def is_init() -> bool:
    return os.getpid() == 1


def become_subreaper() -> None:
    """Make orphaned descendants ours to reap (PID 1 is that already; this is for --subreaper)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_adopted(is_ours: Callable[[int], bool]) -> tuple[list[tuple[int, int]], bool]:
    """Reap every waitable zombie that is not ours. Returns (pid, status) of each reaped orphan and
    whether one of our own zombies blocked the view (then call again shortly).

    waitid(P_ALL, WNOWAIT) peeks at the first waitable child without reaping it. If it is an
    orphan we reap exactly that pid; if it is one of our own, we leave it to children.py and stop,
    because waitid(P_ALL) keeps returning that same first zombie until it is reaped.

    The race: a child of ours must never look like an orphan. `is_ours` is fed from
    children.run_child's `on_start`, which runs synchronously right after Popen returns, and Popen
    itself forks, execs and (on exec failure) reaps synchronously. All of it happens on the event
    loop thread, the same thread this runs on, so there is no instant at which one of our pids
    exists, is unknown to `is_ours` and this code runs. A child stops being ours the moment
    children.py has reaped it (its status is set in the same synchronous step), so a recycled pid
    is never mistaken for ours. Anything that spawned processes another way while the reaper runs
    (asyncio subprocesses, threads) would race with it: children.py is the only place that spawns.
    """
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped, False  # no children at all
        if info is None:
            return reaped, False  # children, but none has exited
        if is_ours(info.si_pid):
            return reaped, True
        try:
            _, status = os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            continue  # reaped meanwhile by someone else (cannot happen on one thread; be safe)
        reaped.append((info.si_pid, os.waitstatus_to_exitcode(status)))


async def reap_orphans(is_ours: Callable[[int], bool]) -> None:
    """Reap adopted orphans for as long as this task runs: at start, then on every SIGCHLD."""
    import anyio
    import structlog

    log = structlog.get_logger()
    with anyio.open_signal_receiver(signal.SIGCHLD) as sigchld:
        while True:
            reaped, blocked = reap_adopted(is_ours)
            for pid, status in reaped:
                log.info("reaped an adopted orphan", pid=pid, status=status)
            if blocked:
                await anyio.sleep(OWN_ZOMBIE_RECHECK_S)
                continue
            # SIGCHLDs coalesce; one wake-up per burst is enough since each pass drains all zombies.
            await anext(sigchld)
