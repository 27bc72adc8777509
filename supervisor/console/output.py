"""The console's output path: the guest's output, read and shown by a thread of its own.

A guest prints faster than a terminal shows it, and a PTY hands its output over 4 KiB per read.
Done as event-loop tasks, every read and every write that waits costs a round of the loop (future,
epoll_ctl twice, callbacks), and the console reached about 0.6x the throughput of a plain copy
loop. `OutputPump` is that copy loop - poll, read, write - in a thread, with the console's own work
(filter, replay, log) between the read and the write; the event loop keeps the input, attaches and
resizes. bench/console.py measures both against the copy loop.

Output goes to `Sink`s: the supervisor's own terminal and each attach client. Either thread may
write to a sink: what its fd takes at once is written at once, the rest is queued in order and
written out by the pump as the fd takes it (or by `Sink.drain` once the pump has ended).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

import anyio
import anyio.to_thread

from supervisor.console.log import ConsoleLog

READ_SIZE = 64 << 10  # a PTY gives at most 4 KiB per read; a pipe (tests, bench) more
HELD_BACK_RECHECK_MS = 1000  # while output waits for a terminal, `paused` is asked this often too


class Sink:
    """An fd the console's output goes to, in order, written from either thread.

    On the first write error the sink fails: what is queued is dropped, later writes are ignored,
    and `on_error` is called once, from the thread that hit the error, with no lock held.
    """

    def __init__(
        self, fd: int, *, wake_pump: Callable[[], None], on_error: Callable[[OSError], None]
    ) -> None:
        self.fd = fd
        self._wake_pump = wake_pump
        self._on_error = on_error
        self._lock = threading.Lock()
        self._queue = bytearray()  # the attributes below are guarded by _lock
        self._closed = False
        self._progress_at = 0.0  # when the queue last shrank, or began
        self.failed = False

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def waiting_since(self, now: float) -> float:
        """Seconds the fd has taken nothing of what is queued (0 with nothing queued)."""
        with self._lock:
            return now - self._progress_at if self._queue else 0.0

    def write(self, data: bytes) -> None:
        if not data:
            return
        error = None
        with self._lock:
            if self._closed:
                return
            if self._queue:
                self._queue += data
                return  # the pump is already waiting for the fd to take more
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                error = self._fail(exc)
                written = len(data)
            if written < len(data):
                self._queue += memoryview(data)[written:]
                self._progress_at = time.monotonic()
        if error is not None:
            self._on_error(error)
        elif self._queue:
            self._wake_pump()  # so that it waits for the fd to take the rest

    def flush(self) -> None:
        """Write what is queued, as far as the fd takes it now; never blocks."""
        error = None
        with self._lock:
            while self._queue and not self._closed:
                try:
                    written = os.write(self.fd, self._queue)
                except BlockingIOError:
                    break
                except OSError as exc:
                    error = self._fail(exc)
                    break
                del self._queue[:written]
                self._progress_at = time.monotonic()
        if error is not None:
            self._on_error(error)

    async def drain(self) -> None:
        """From the event loop: until everything queued is written (the caller bounds the time)."""
        while True:
            self.flush()
            if not self._queue or self._closed:
                return
            await anyio.wait_writable(self.fd)

    def abandon(self) -> None:
        """Write nothing more; what is queued is dropped. The fd stays open: it is the caller's."""
        with self._lock:
            self._closed = True
            self._queue.clear()

    def _fail(self, exc: OSError) -> OSError:
        """Under the lock: the error closes the sink (so there is never a second one to report)."""
        self._closed = True
        self._queue.clear()
        self.failed = True
        return exc


class OutputPump:
    """Reads the guest's output and hands it to `on_output`, writes out what the sinks queued,
    and keeps the console log at most `log_delay` behind, all in one thread, until the guest
    side of the PTY closes or `stop` is called.

    `sinks` and `paused` are asked on every round: the sinks to write out, and whether to leave
    the guest's output unread for now (a terminal that does not keep up slows the guest down).
    """

    def __init__(
        self,
        master: int,
        *,
        on_output: Callable[[bytes], None],
        on_end: Callable[[], None],
        sinks: Callable[[], Sequence[Sink]],
        paused: Callable[[], bool],
        log: ConsoleLog | None,
        log_delay: float,
    ) -> None:
        self._master = master
        self._on_output = on_output
        self._on_end = on_end
        self._sinks = sinks
        self._paused = paused
        self._log = log
        self._log_delay = log_delay
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self.running = False  # the thread is in _pump
        self._thread = 0  # its ident

    def wake(self) -> None:
        """From any thread: look again at the sinks (one has something queued) and at `paused`.
        The pump itself looks again after every round anyway."""
        if threading.get_ident() != self._thread:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        self._stopping = True
        self.wake()

    def close(self) -> None:
        """After `run` ended."""
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    async def run(self) -> None:
        """Pump in a worker thread until the guest side closes; cancelled, stop the thread first:
        it must not write to a terminal that is being given back."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_when_cancelled)
            await anyio.to_thread.run_sync(self._pump)
            tg.cancel_scope.cancel()

    async def _stop_when_cancelled(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self.stop()

    def _pump(self) -> None:
        self._thread = threading.get_ident()
        self.running = True
        try:
            self._rounds()
        finally:
            self.running = False

    def _rounds(self) -> None:
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        reading = False
        writing: dict[int, Sink] = {}
        while not self._stopping:
            # What to wait for: output while the terminals keep up, room in the sinks that wait.
            if reading != (keep_up := not self._paused()):
                reading = keep_up
                if reading:
                    poller.register(self._master, select.POLLIN)
                else:
                    poller.unregister(self._master)
            waiting = {sink.fd: sink for sink in self._sinks() if sink.backlog}
            if waiting.keys() != writing.keys():
                for fd in writing.keys() - waiting.keys():
                    poller.unregister(fd)
                for fd in waiting.keys() - writing.keys():
                    poller.register(fd, select.POLLOUT)
            writing = waiting
            timeout = self._flush_log_when_due()
            if not reading:  # `paused` may change with time alone (a stalled attach is dropped)
                timeout = HELD_BACK_RECHECK_MS if timeout is None else min(timeout, HELD_BACK_RECHECK_MS)
            for fd, _events in poller.poll(timeout):
                if fd == self._master:
                    if not self._read():
                        self._on_end()
                        return
                elif fd in writing:
                    writing[fd].flush()
                elif fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake_fd)

    def _read(self) -> bool:
        """False at the end of the output (EIO: the slave side closed, QEMU is gone)."""
        try:
            data = os.read(self._master, READ_SIZE)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            return False
        if data:
            self._on_output(data)
        return bool(data)

    def _flush_log_when_due(self) -> int | None:
        """Flush the log if output waited long enough; else milliseconds until it will have."""
        log = self._log
        if log is None or log.pending_since is None:
            return None
        wait = log.pending_since + self._log_delay - time.monotonic()
        if wait > 0:
            return int(wait * 1000) + 1
        log.flush()
        return None
