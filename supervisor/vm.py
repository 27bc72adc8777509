"""One VM instance: the only place that composes task groups.

    instance dir + watchdog
      shares task group          (outer: stopped last)
        virtiofsd[work], virtiofsd[agent-home], virtiofsd[cri-storage]
        vm task group            (inner: stopped first)
          runner (QEMU), QMP channel, console proxy, signal handling

Whatever ends first ends everything: the runner exiting is the normal end; a virtiofsd dying
while the VM still needs it, a signal, or the console's stop key starts the stop path. Teardown
order is the nesting of the groups, and the first cause recorded decides the exit status.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from supervisor import console, consolelog, guest, readiness, runtime
from supervisor.children import (
    Child,
    ChildSpec,
    describe_status,
    exit_code_of,
    read_start_ticks,
    run_child,
)
from supervisor.config import Machine, SocketMode
from supervisor.errors import ExitCode, SupervisorError
from supervisor.plan import Plan
from supervisor.qemu import QemuSpec, qemu_argv
from supervisor.qmp import QmpClient, QmpError
from supervisor.virtiofsd import ShareSpec, bind_vhost_user_socket, virtiofsd_argv
from supervisor.watchdog import Watchdog

# A virtiofsd that exits cleanly while QEMU is alive is normal during a shutdown (QEMU closes the
# vhost-user connection before its own exit); this long, it waits for QEMU to confirm.
SHARE_EXIT_CONFIRM_S = 2.0
INSTANCE_ENV = "AGENTVM_INSTANCE"


@dataclass
class Outcome:
    """Why the instance ended; the first cause wins."""

    signal: int | None = None
    stopped_from_console: bool = False
    error: SupervisorError | None = None
    shutting_down: anyio.Event = field(default_factory=anyio.Event)

    def fail(self, error: SupervisorError) -> None:
        if self.error is None and self.signal is None:
            self.error = error


@dataclass(frozen=True)
class Stdio:
    stdin: int
    stdout: int


class Instance:
    def __init__(self, plan: Plan, watchdog: Watchdog, stdio: Stdio) -> None:
        self.plan = plan
        self.watchdog = watchdog
        self.stdio = stdio
        self.outcome = Outcome()
        self.children: list[Child] = []
        self.runner: Child | None = None
        self.qmp: QmpClient | None = None
        self.log = structlog.get_logger().bind(instance=plan.instance)
        self._stop_requested = anyio.Event()
        self._console_done = anyio.Event()
        self._state_groups: list[runtime.GroupRecord] = []
        self._supervisor_ticks = 0
        self.report = guest.GuestReport(None, None)
        self._console_log: consolelog.ConsoleLog | None = None

    # ---- state file and watchdog -------------------------------------------------------------

    def _record_state(self) -> None:
        runtime.write_state(
            self.plan.instance_dir,
            runtime.InstanceState(
                instance=self.plan.instance,
                supervisor_pid=os.getpid(),
                supervisor_start_ticks=self._supervisor_ticks,
                created=runtime.now(),
                work_dir=str(self.plan.work_dir) if self.plan.work_dir else None,
                groups=tuple(self._state_groups),
            ),
        )

    def _adopt(self, child: Child) -> None:
        """Called right after each fork: the watchdog and the state file learn the new group."""
        self.watchdog.guard_group(child.pid)
        self.children.append(child)
        self._state_groups.append(runtime.GroupRecord(child.name, child.pid, child.start_ticks))
        self._record_state()

    # ---- the stop path -----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def _graceful_stop(self, runner: Child) -> None:
        """system_powerdown, a deadline, QMP quit, a deadline, then the group kill in run_child."""
        timeouts = self.plan.timeouts
        if self.qmp is not None:
            try:
                await self.qmp.execute("system_powerdown")
                self.log.info("asked the guest to power off", deadline_s=timeouts.graceful_stop)
                with anyio.move_on_after(timeouts.graceful_stop):
                    await runner.exited.wait()
                    return
                self.log.warning("the guest did not power off in time; quitting QEMU")
                await self.qmp.execute("quit")
                with anyio.move_on_after(timeouts.quit):
                    await runner.exited.wait()
                    return
            except QmpError as exc:
                self.log.info("QMP unavailable for a graceful stop", reason=str(exc))
        runner.stop()

    async def _handle_signals(self, everything: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP and self.outcome.signal == signal.SIGHUP:
                    continue  # the same hangup again: the kernel and the shell both send it
                first = self.outcome.signal is None
                if first:
                    self.outcome.signal = signum
                    self.log.warning("stopping on signal", signal=signal.Signals(signum).name)
                if self.runner is None:  # still starting: nothing to power off, stop it all now
                    everything.cancel()
                elif first:
                    self.request_stop()
                else:  # a second signal: no more patience
                    self.log.warning("second signal: stopping now")
                    self.runner.stop()

    async def _stop_when_requested(self, runner: Child) -> None:
        await self._stop_requested.wait()
        await self._graceful_stop(runner)

    def _on_qmp_event(self, event: str, data: dict[str, Any]) -> None:
        self.log.info("qemu event", qemu_event=event, **{k: str(v) for k, v in data.items()})
        if event == "SHUTDOWN":
            self.outcome.shutting_down.set()

    # ---- shares ------------------------------------------------------------------------------

    async def _watch_share(self, child: Child, share: ShareSpec) -> None:
        await child.exited.wait()
        runner = self.runner
        if runner is None or runner.exited.is_set() or self.outcome.shutting_down.is_set():
            return
        if child.status == 0:
            with anyio.move_on_after(SHARE_EXIT_CONFIRM_S):
                async with anyio.create_task_group() as tg:

                    async def runner_ends() -> None:
                        await runner.exited.wait()
                        tg.cancel_scope.cancel()

                    async def shutdown_seen() -> None:
                        await self.outcome.shutting_down.wait()
                        tg.cancel_scope.cancel()

                    tg.start_soon(runner_ends)
                    tg.start_soon(shutdown_seen)
            if runner.exited.is_set() or self.outcome.shutting_down.is_set():
                return
        said = child.stderr_excerpt()
        said = f" Its last output: {said}." if said else ""
        self.outcome.fail(
            SupervisorError(
                f"virtiofsd for share '{share.tag}' (pid {child.pid}, {share.source}) "
                f"{describe_status(child.status)} while the VM was running.{said} The VM was stopped, "
                "because I/O on that share would hang it. Check that the directory is still there and "
                "that nothing kills the daemon (OOM killer, a cleanup script).",
                exit_code=ExitCode.SHARE_FAILED,
            )
        )
        self.log.error("share daemon died; stopping the VM", share=share.tag)
        runner.stop()  # QEMU would hang on the dead share, even during the guest's own power-off

    def _share_child(self, share: ShareSpec, fd: int | None) -> ChildSpec:
        plan = self.plan
        return ChildSpec(
            name=f"virtiofsd[{share.tag}]",
            argv=virtiofsd_argv(
                plan.virtiofsd_binary,
                share,
                socket_mode=plan.socket_mode,
                fd=fd,
                sandbox=plan.sandbox,
                extra_args=plan.virtiofsd_extra_args,
            ),
            pass_fds=(fd,) if fd is not None else (),
            env=self._child_env(),
            kill_grace=plan.timeouts.kill_grace,
        )

    def _child_env(self) -> dict[str, str]:
        # The instance id in every child's environment lets `list`, stale cleanup and tests find
        # a child by instance even when its argv does not name it.
        return {**os.environ, INSTANCE_ENV: self.plan.instance}

    async def _start_shares(self, tg: anyio.abc.TaskGroup) -> None:
        plan = self.plan
        if plan.socket_mode is SocketMode.FD:
            for share in plan.shares:
                listener = bind_vhost_user_socket(share.socket_path)
                try:
                    child = await tg.start(self._run_child, self._share_child(share, listener.fileno()))
                finally:
                    listener.close()  # virtiofsd holds it now; if it dies, QEMU's connect fails
                tg.start_soon(self._watch_share, child, share)
            return
        started = []
        for share in plan.shares:
            child = await tg.start(self._run_child, self._share_child(share, None))
            tg.start_soon(self._watch_share, child, share)
            started.append((child, share))
        async with anyio.create_task_group() as waits:
            for child, share in started:
                waits.start_soon(self._wait_share_socket, child, share)

    async def _wait_share_socket(self, child: Child, share: ShareSpec) -> None:
        waited = await readiness.wait_socket(
            share.socket_path,
            child,
            timeout=self.plan.timeouts.socket_ready,
            owner=f"virtiofsd for share '{share.tag}'",
        )
        self.log.info("share ready", share=share.tag, waited_ms=round(waited * 1000, 1))

    async def _run_child(self, spec: ChildSpec, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        await run_child(spec, on_start=self._adopt, task_status=task_status)

    # ---- the runner --------------------------------------------------------------------------

    def _runner_spec(
        self, pty: console.ConsolePty, private_qmp: int, public_qmp: int, resize: int
    ) -> ChildSpec:
        plan = self.plan
        argv = qemu_argv(
            QemuSpec(
                binary=plan.qemu_binary,
                instance=plan.instance,
                machine=Machine(plan.machine),
                accel=plan.accel,
                cpu=plan.cpu,
                kernel=plan.kernel,
                initrd=plan.initrd,
                cmdline=plan.cmdline,
                memory_mib=plan.memory_mib,
                vcpus=plan.vcpus,
                shares=[(share.tag, share.socket_path) for share in plan.shares],
                private_qmp_fd=private_qmp,
                public_qmp_fd=public_qmp,
                status_file=plan.status_file,
                extra_args=plan.qemu_extra_args,
                resize_fd=resize,
            )
        )
        return ChildSpec(
            name="runner",
            argv=argv,
            pass_fds=(private_qmp, public_qmp, resize),
            stdin=pty.slave,
            stdout=pty.slave,
            env=self._child_env(),
            kill_grace=plan.timeouts.kill_grace,
        )

    async def _run_vm(self) -> None:
        plan = self.plan
        size = console.get_window_size(self.stdio.stdin)
        pty = console.open_console_pty(size)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        resize_ours, resize_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        public = bind_vhost_user_socket(plan.qmp_socket)
        listener = console.bind_console_socket(plan.console_socket)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    runner = await tg.start(
                        self._run_child,
                        self._runner_spec(pty, theirs.fileno(), public.fileno(), resize_theirs.fileno()),
                    )
                finally:
                    pty.close_slave()  # QEMU has it: its exit now reads as EOF on the master
                    theirs.close()
                    resize_theirs.close()
                    public.close()
                self.runner = runner
                self.log.info("vm started", accel=plan.accel.value, why=plan.accel_reason)
                self.qmp = QmpClient(ours, self._on_qmp_event)
                tg.start_soon(self.qmp.run)
                tg.start_soon(self._stop_when_requested, runner)
                tg.start_soon(self._run_console, pty, size, resize_ours, listener)
                await runner.exited.wait()
                # The guest's last words are still in the PTY; the proxy sees EOF once they are out.
                with anyio.move_on_after(1.0):
                    await self._console_done.wait()
                tg.cancel_scope.cancel()
        finally:
            pty.close()
            ours.close()
            resize_ours.close()
            listener.close()

    # ---- the console -------------------------------------------------------------------------

    async def _run_console(
        self,
        pty: console.ConsolePty,
        size: tuple[int, int] | None,
        resize_port: socket.socket,
        listener: socket.socket,
    ) -> None:
        def stop_from_console() -> None:
            self.outcome.stopped_from_console = True
            self.request_stop()

        resize_port.setblocking(False)
        the_console = console.Console(
            pty,
            instance=self.plan.instance,
            settings=self.plan.console,
            size=size,
            on_stop=stop_from_console,
            on_hangup=self._terminal_hung_up,
            on_terminal_reset=self.watchdog.guard_terminal_modes,
            resize_port=resize_port,
            log=self._console_log,
        )
        try:
            await the_console.run(stdin_fd=self.stdio.stdin, stdout_fd=self.stdio.stdout, listener=listener)
        finally:
            self._console_done.set()

    def _terminal_hung_up(self) -> None:
        """The user's terminal went away (its pane closed): what SIGHUP does, with or without one."""
        if self.outcome.signal is None:
            self.outcome.signal = signal.SIGHUP
            self.log.warning("the terminal hung up; stopping the VM")
        self.request_stop()

    def _open_console_log(self) -> None:
        settings = self.plan.console
        if settings.log_dir is not None:
            self._console_log = consolelog.open_log(
                settings.log_dir, self.plan.instance, max_bytes=settings.log_max_bytes, keep=settings.log_keep
            )
            self.log.info("console log", path=str(self._console_log.path))

    # ---- the whole instance ------------------------------------------------------------------

    def _prepare_share_dirs(self) -> None:
        for share in self.plan.shares:
            if share.source.exists():
                continue
            try:
                share.source.mkdir(mode=0o700, parents=True)
                if os.geteuid() == 0:
                    os.chown(share.source, share.ids.host_uid, share.ids.host_gid)
            except OSError as exc:
                raise SupervisorError(
                    f"cannot create the directory {share.source} for share '{share.tag}' "
                    f"({exc.strerror}): create it yourself or choose another path",
                    exit_code=ExitCode.CANT_CREATE,
                ) from None
            self.log.info("created share directory", share=share.tag, path=str(share.source))

    async def run(self) -> int:
        plan = self.plan
        runtime.ensure_base(plan.base_dir)
        runtime.clean_stale(plan.base_dir)
        self._prepare_share_dirs()
        runtime.create_instance_dir(plan.base_dir, plan.instance)
        self.watchdog.guard_dir(plan.instance_dir)
        self._supervisor_ticks = read_start_ticks(os.getpid())
        try:
            self._record_state()
            self._open_console_log()
            self.log.info("instance", runtime_dir=str(plan.instance_dir))
            try:
                async with anyio.create_task_group() as everything:
                    everything.start_soon(self._handle_signals, everything.cancel_scope)
                    async with anyio.create_task_group() as shares:
                        await self._start_shares(shares)
                        await self._run_vm()
                        shares.cancel_scope.cancel()
                    everything.cancel_scope.cancel()
            except SupervisorError as exc:
                self.outcome.fail(exc)
            except BaseExceptionGroup as group:  # a SupervisorError raised in a child task
                errors, rest = group.split(SupervisorError)
                if rest is not None:
                    raise rest from None
                if errors is not None:
                    self.outcome.fail(_first_error(errors))
            if plan.builtin_guest:
                self.report = guest.read_status(plan.status_file)
        finally:
            runtime.remove_instance_dir(plan.instance_dir)
            if self._console_log is not None:
                self._console_log.close()
        return self._exit_code()

    def _exit_code(self) -> int:
        outcome = self.outcome
        if outcome.signal is not None:
            return ExitCode.SIGNAL_BASE + outcome.signal
        if outcome.error is not None:
            raise outcome.error
        runner = self.runner
        if runner is None or runner.status is None:
            raise SupervisorError("the runner never started", exit_code=ExitCode.INTERNAL)
        said = runner.stderr_excerpt()
        said = f" QEMU said: {said}." if said else ""
        if not self.plan.builtin_guest:
            if runner.status != 0:
                self.log.error("runner failed", status=describe_status(runner.status))
            return exit_code_of(runner.status)
        report = self.report
        if report.error is not None:
            raise SupervisorError(
                f"the built-in guest failed before running the command: {report.error}. Run with "
                "--verbose to see the guest console and the virtiofsd logs.",
                exit_code=ExitCode.GUEST_FAILED,
            )
        if report.exit_status is not None:
            return report.exit_status
        if outcome.stopped_from_console:
            return ExitCode.STOPPED_FROM_CONSOLE
        if runner.status < 0:
            print(
                f"agentvm-supervise: QEMU (pid {runner.pid}) was {describe_status(runner.status)} before "
                "the guest reported a status; nothing is left running.",
                file=sys.stderr,
            )
            return exit_code_of(runner.status)
        raise SupervisorError(
            f"QEMU (pid {runner.pid}) exited with {describe_status(runner.status)} before the guest "
            f"reported a status.{said} Check the QEMU command line with --debug.",
            exit_code=ExitCode.RUNNER_FAILED,
        )


def _first_error(group: BaseExceptionGroup[SupervisorError]) -> SupervisorError:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        return exc
    raise AssertionError("empty exception group")
