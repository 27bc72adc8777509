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
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from supervisor import (
    console,
    consolelog,
    control,
    egress,
    kvm_watch,
    launcher,
    pid1,
    readiness,
    runtime,
    sharedirs,
    statusport,
)
from supervisor import runner as microvm
from supervisor.children import (
    Child,
    ChildSpec,
    describe_status,
    exit_code_of,
    read_start_ticks,
    run_child,
)
from supervisor.config import Hypervisor, SocketMode
from supervisor.egress.proxy import Proxy
from supervisor.errors import ExitCode, SupervisorError
from supervisor.notify import Notifier, stop_budget
from supervisor.plan import Plan
from supervisor.qemu import qemu_argv
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
    stopped_by_control: bool = False  # `agentvm-supervise stop`: exits as if by SIGTERM
    error: SupervisorError | None = None
    shutting_down: anyio.Event = field(default_factory=anyio.Event)

    def fail(self, error: SupervisorError) -> None:
        if self.error is None and self.signal is None and not self.stopped_by_control:
            self.error = error


@dataclass(frozen=True)
class Stdio:
    stdin: int
    stdout: int


@dataclass(frozen=True)
class Host:
    """What the host around the supervisor asks of it (container hosts, service managers)."""

    subreaper: bool = False  # reap adopted orphans (always when PID 1)
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    stop_signals: pid1.StopSignals | None = None  # signals that arrived before the loop took over


class Instance:
    def __init__(self, plan: Plan, watchdog: Watchdog, stdio: Stdio, host: Host | None = None) -> None:
        self.plan = plan
        self.watchdog = watchdog
        self.stdio = stdio
        self.host = host if host is not None else Host()
        self._console: console.Console | None = None
        self.started = time.time()
        self.stop_cause: str | None = None
        self._stop_deadline: float | None = None
        self._everything: anyio.CancelScope | None = None
        self.outcome = Outcome()
        self.children: list[Child] = []
        self.runner: Child | None = None
        self.qmp: QmpClient | None = None
        self.log = structlog.get_logger().bind(instance=plan.instance)
        self._stop_requested = anyio.Event()
        self._console_done = anyio.Event()
        self._state_groups: list[runtime.GroupRecord] = []
        self._supervisor_ticks = 0
        self._created = runtime.now()  # the instance's start, kept across state rewrites
        self.report = statusport.GuestReport()
        self._console_log: consolelog.ConsoleLog | None = None
        self._share_dirs: dict[str, int] = {}  # tag -> the share's open directory (see sharedirs)
        self.egress: Proxy | None = None  # allowlist mode: the guest's only way out

    # ---- state file and watchdog -------------------------------------------------------------

    def _record_state(self) -> None:
        runtime.write_state(
            self.plan.instance_dir,
            runtime.InstanceState(
                instance=self.plan.instance,
                supervisor_pid=os.getpid(),
                supervisor_start_ticks=self._supervisor_ticks,
                created=self._created,
                work_dir=str(self.plan.work_dir) if self.plan.work_dir else None,
                groups=tuple(self._state_groups),
                pid_ns=runtime.pid_namespace(),
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

    def _stopping(self, cause: str) -> None:
        """Teardown begins: remember the first cause and tell the service manager."""
        if self.stop_cause is None:
            self.stop_cause = cause
            budget = stop_budget(self.plan.timeouts, self._stop_deadline)
            self.host.notifier.stopping(f"stopping {self.plan.instance}: {cause}", budget=budget)

    async def _graceful_stop(self, runner: Child) -> None:
        """system_powerdown, a deadline, QMP quit, a deadline, then the group kill in run_child."""
        timeouts = self.plan.timeouts
        graceful = self._stop_deadline if self._stop_deadline is not None else timeouts.graceful_stop
        planned = self.plan.runner
        if planned is not None and planned.hypervisor is Hypervisor.CLOUD_HYPERVISOR:
            await self._graceful_stop_api(runner)
            return
        if self.qmp is not None:
            # Each step has its deadline around the QMP call too: a QEMU that never finished the
            # QMP handshake must not hold the stop path forever.
            try:
                with anyio.move_on_after(graceful):
                    await self.qmp.execute("system_powerdown")
                    self.log.info("asked the guest to power off", deadline_s=graceful)
                    await runner.exited.wait()
                    return
                self.log.warning("the guest did not power off in time; quitting QEMU")
                with anyio.move_on_after(timeouts.quit):
                    await self.qmp.execute("quit")
                    await runner.exited.wait()
                    return
            except QmpError as exc:
                self.log.info("QMP unavailable for a graceful stop", reason=str(exc))
        runner.stop()

    async def _graceful_stop_api(self, child: Child) -> None:
        """cloud-hypervisor: vm.power-button, a deadline, vmm.shutdown, a deadline, then the kill."""
        timeouts = self.plan.timeouts
        api = self.plan.instance_dir / microvm.API_SOCKET
        steps = (("vm.power-button", timeouts.graceful_stop), ("vmm.shutdown", timeouts.quit))
        for endpoint, deadline in steps:
            try:
                status = await microvm.ch_api_put(api, endpoint, timeout=min(deadline, 5.0))
            except microvm.ApiError as exc:
                self.log.info("cloud-hypervisor's API unavailable for a graceful stop", reason=str(exc))
                break
            self.log.info("asked cloud-hypervisor", endpoint=endpoint, status=status, deadline_s=deadline)
            with anyio.move_on_after(deadline):
                await child.exited.wait()
                return
            self.log.warning("cloud-hypervisor did not exit in time", endpoint=endpoint)
        child.stop()

    async def _handle_signals(self, everything: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(*pid1.STOP_SIGNALS) as signals:
            # Signals that came after the loop started but before this receiver existed.
            early = self.host.stop_signals.take() if self.host.stop_signals is not None else []
            for signum in early:
                self._on_signal(signum, everything)
            async for signum in signals:
                self._on_signal(signum, everything)

    def _on_signal(self, signum: int, everything: anyio.CancelScope) -> None:
        if signum == signal.SIGHUP and self.outcome.signal == signal.SIGHUP:
            return  # the same hangup again: the kernel and the shell both send it when a pane closes
        first = self.outcome.signal is None
        if first:
            self.outcome.signal = signum
            self.log.warning("stopping on signal", signal=signal.Signals(signum).name)
            self._stopping(f"signal {signal.Signals(signum).name}")
        if self.runner is None:  # still starting: nothing to power off, stop it all now
            everything.cancel()
        elif first:
            self.request_stop()
        else:  # a second signal: no more patience
            self.log.warning("second signal: stopping now")
            self.runner.stop()

    @property
    def console_attached(self) -> bool:
        """For `status`: a terminal (ours, or an `attach` client) holds the console."""
        return self._console is not None and self._console.attached is not None

    # ---- the control socket (control.Controlled) ---------------------------------------------

    def control_stop(self, deadline: float | None) -> None:
        if self.stop_cause is not None:
            return  # already stopping; the first stop's deadline stands
        self.outcome.stopped_by_control = True
        self._stop_deadline = deadline
        self._stopping("stop requested on the control socket")
        if self.runner is None:
            if self._everything is not None:
                self._everything.cancel()
        else:
            self.request_stop()

    def control_status(self) -> control.InstanceStatus:
        plan = self.plan
        runner = self.runner
        phase: control.Phase = "running"
        if runner is None:
            phase = "starting"
        if self.stop_cause is not None or (runner is not None and runner.exited.is_set()):
            phase = "stopping"
        return control.InstanceStatus(
            instance=plan.instance,
            phase=phase,
            supervisor_pid=os.getpid(),
            started=self.started,
            runtime_dir=str(plan.instance_dir),
            work_dir=str(plan.work_dir) if plan.work_dir else None,
            accelerator=plan.accel.value,
            accelerator_reason=plan.accel_reason,
            machine=plan.machine,
            memory_mib=plan.memory_mib,
            vcpus=plan.vcpus,
            guest="built-in" if plan.builtin_guest else str(plan.kernel),
            command=plan.command,
            console_attached=self.console_attached,
            stop_cause=self.stop_cause,
            children=[control.child_info(child) for child in self.children],
            shares=[control.share_info(share) for share in plan.shares],
            egress=egress.egress_info(self.egress, plan.egress) if self.egress is not None else None,
        )

    def _is_own_child(self, pid: int) -> bool:
        """For the orphan reaper: a child children.py has started and not yet reaped."""
        return any(child.pid == pid and child.status is None for child in self.children)

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
        if self.outcome.shutting_down.is_set():
            return
        if runner is not None and runner.exited.is_set() and (child.status == 0 or runner.status == 0):
            return  # it followed QEMU out, or it died after the VM had ended well
        # Dying before QEMU could use it is the cause of what QEMU does next (it cannot connect):
        # name the share, not QEMU's "Connection refused".
        early = runner is None or runner.exited.is_set()
        if runner is not None and not early and child.status == 0:
            await self._confirm_vm_ending(runner)
            if runner.exited.is_set() or self.outcome.shutting_down.is_set():
                return
        error = self._share_error(child, share, early=early)
        self.outcome.fail(error)
        self.log.error("share daemon died; stopping the VM", share=share.tag)
        if runner is None:
            raise error  # still starting: this ends the start
        runner.stop()  # QEMU would hang on the dead share, even during the guest's own power-off

    @staticmethod
    def _share_error(child: Child, share: ShareSpec, *, early: bool) -> SupervisorError:
        said = child.stderr_excerpt()
        said = f" Its last output: {said}." if said else ""
        when, consequence = (
            ("before the VM could use it", "The VM was not started, or stopped at once.")
            if early
            else ("while the VM was running", "The VM was stopped, because I/O on that share would hang it.")
        )
        return SupervisorError(
            f"virtiofsd for share '{share.tag}' (pid {child.pid}, {share.source}) exited "
            f"({describe_status(child.status)}) {when}.{said} {consequence} Check that the directory "
            "exists and is readable, that the virtiofsd flags suit this virtiofsd (--debug shows "
            "them), and that nothing kills the daemon (OOM killer, a cleanup script).",
            exit_code=ExitCode.SHARE_FAILED,
        )

    def _share_that_failed_the_runner(self) -> SupervisorError | None:
        """A virtiofsd that died on its own explains a runner that failed (it could not connect).

        The share's watcher usually says so first; this covers the race where the runner's exit was
        seen first and teardown cancelled the watcher before it ran.
        """
        by_tag = {f"virtiofsd[{share.tag}]": share for share in self.plan.shares}
        for child in self.children:
            share = by_tag.get(child.name)
            if share is not None and child.status not in (None, 0) and not child.stopped_by_us:
                return self._share_error(child, share, early=True)
        return None

    async def _confirm_vm_ending(self, runner: Child) -> None:
        """Wait briefly for the runner's exit or a SHUTDOWN event, whichever comes first."""
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
                source_fd=self._share_dirs[share.tag],
            ),
            pass_fds=(self._share_dirs[share.tag], *((fd,) if fd is not None else ())),
            env=self._child_env(),
            kill_grace=plan.timeouts.kill_grace,
        )

    def _child_env(self) -> dict[str, str]:
        # The instance id in every child's environment lets `list`, stale cleanup and tests find
        # a child by instance even when its argv does not name it.
        # No child needs the agent's API key: it goes to the guest through .microvm-env only.
        return launcher.child_environment(os.environ, {INSTANCE_ENV: self.plan.instance})

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

    def _microvm_runner_spec(
        self, planned: microvm.RunnerPlan, pty: console.ConsolePty, private_qmp: int
    ) -> ChildSpec:
        """A rewritten copy of the microvm.nix runner, in the runtime dir, run by its own shell."""
        plan = self.plan
        qemu = planned.hypervisor is Hypervisor.QEMU
        script = plan.instance_dir / microvm.SCRIPT_NAME
        script.write_text(planned.render(plan.instance_dir, private_qmp if qemu else None))
        script.chmod(0o500)
        return ChildSpec(
            name="runner",
            argv=planned.argv(script),
            pass_fds=(private_qmp,) if qemu else (),
            stdin=pty.slave,
            stdout=pty.slave,
            env=self._child_env(),
            cwd=str(planned.cwd or plan.instance_dir),
            kill_grace=plan.timeouts.kill_grace,
        )

    def _runner_spec(
        self, pty: console.ConsolePty, private_qmp: int, public_qmp: int | None, resize: int, status: int
    ) -> ChildSpec:
        plan = self.plan
        if plan.runner is not None:  # its guest has no resize helper of ours to talk to
            return self._microvm_runner_spec(plan.runner, pty, private_qmp)
        assert public_qmp is not None
        argv = qemu_argv(
            plan.qemu_spec(
                private_qmp_fd=private_qmp, public_qmp_fd=public_qmp, status_fd=status, resize_fd=resize
            )
        )
        return ChildSpec(
            name="runner",
            argv=argv,
            pass_fds=(private_qmp, public_qmp, resize, status),
            stdin=pty.slave,
            stdout=pty.slave,
            env=self._child_env(),
            kill_grace=plan.timeouts.kill_grace,
        )

    async def _run_vm(self) -> None:
        plan = self.plan
        if self.outcome.error is not None:  # a share died while starting: no VM to start
            return
        size = console.get_window_size(self.stdio.stdin)
        pty = console.open_console_pty(size)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        resize_ours, resize_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        status_ours, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        status_port = statusport.StatusPort(status_ours)
        # A microvm.nix runner's own -qmp is moved to the same path; QEMU binds that one itself.
        public = bind_vhost_user_socket(plan.qmp_socket) if plan.runner is None else None
        listener = console.bind_console_socket(plan.console_socket)
        uses_qmp = plan.runner is None or plan.runner.hypervisor is Hypervisor.QEMU
        try:
            async with anyio.create_task_group() as tg:
                try:
                    spec = self._runner_spec(
                        pty,
                        theirs.fileno(),
                        public.fileno() if public else None,
                        resize_theirs.fileno(),
                        status_theirs.fileno(),
                    )
                    runner = await tg.start(self._run_child, spec)
                finally:
                    pty.close_slave()  # QEMU has it: its exit now reads as EOF on the master
                    theirs.close()
                    resize_theirs.close()
                    status_theirs.close()
                    if public is not None:
                        public.close()
                self.runner = runner
                self.log.info("vm started", accel=plan.accel.value, why=plan.accel_reason)
                if uses_qmp:
                    self.qmp = QmpClient(ours, self._on_qmp_event)
                    tg.start_soon(self.qmp.run)
                    tg.start_soon(self._announce_ready, self.qmp)
                else:  # cloud-hypervisor has no QMP to answer: started is all we can know
                    self.host.notifier.ready(
                        f"running {plan.instance} ({plan.accel.value}, pid {os.getpid()})"
                    )
                tg.start_soon(self._stop_when_requested, runner)
                tg.start_soon(self._run_console, pty, size, resize_ours, listener)
                tg.start_soon(status_port.run)
                tg.start_soon(self._watch_kvm_once_up, self.qmp)
                await runner.exited.wait()
                failed = self.outcome.error is not None
                self._stopping("a share failed" if failed else f"the VM exited ({runner.describe_status()})")
                # The guest's last words are still in the PTY; the proxy sees EOF once they are out.
                with anyio.move_on_after(1.0):
                    await self._console_done.wait()
                tg.cancel_scope.cancel()
            if plan.builtin_guest:
                self.report = status_port.report()
        finally:
            status_port.close()
            pty.close()
            ours.close()
            resize_ours.close()
            listener.close()

    async def _watch_kvm_once_up(self, qmp: QmpClient | None) -> None:
        """Watch the KVM device once QEMU answers on QMP (at once without QMP): the watch is not
        part of the start, and setting it up (pyudev) would compete with QEMU and virtiofsd for the
        CPU meanwhile, and delay the teardown of a runner that exits at once (issue 17)."""
        if qmp is not None:
            await qmp.ready.wait()
            if qmp.closed.is_set():
                return
        await kvm_watch.report_changes(self.plan.kvm_device, self.plan.accel)

    async def _announce_ready(self, qmp: QmpClient) -> None:
        """READY=1 once QEMU answers on QMP: spawned is not ready."""
        await qmp.ready.wait()
        if not qmp.closed.is_set() and self.stop_cause is None:
            plan = self.plan
            self.log.info("ready")
            self.host.notifier.ready(f"running {plan.instance} ({plan.accel.value}, pid {os.getpid()})")

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
            self._stopping("the console's stop key")
            self.request_stop()

        resize_port.setblocking(False)
        self._console = console.Console(
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
            await self._console.run(stdin_fd=self.stdio.stdin, stdout_fd=self.stdio.stdout, listener=listener)
        finally:
            self._console_done.set()

    def _terminal_hung_up(self) -> None:
        """The user's terminal went away (its pane closed): what SIGHUP does, with or without one."""
        if self.outcome.signal is None:
            self.outcome.signal = signal.SIGHUP
            self.log.warning("the terminal hung up; stopping the VM")
            self._stopping("the terminal hung up")
        self.request_stop()

    def _open_console_log(self) -> None:
        settings = self.plan.console
        if settings.log_dir is not None:
            self._console_log = consolelog.open_log(
                settings.log_dir, self.plan.instance, max_bytes=settings.log_max_bytes, keep=settings.log_keep
            )
            self.log.info("console log", path=str(self._console_log.path))

    # ---- the whole instance ------------------------------------------------------------------

    async def _refresh_devshell(self, devshell: launcher.Devshell) -> None:
        """Cache the project's dev shell for the guest; a failure is logged, never fatal."""
        status: int | None = None
        if devshell.argv is not None:
            self.log.warning("caching the dev shell environment", command=" ".join(devshell.argv))
            stdout, stderr = launcher.open_devshell_outputs(devshell)
            spec = ChildSpec(
                name="devshell",
                argv=devshell.argv,
                stdout=stdout,
                stderr=stderr,
                env=self._child_env(),
                cwd=str(devshell.work_dir),
                kill_grace=self.plan.timeouts.kill_grace,
            )
            try:
                async with anyio.create_task_group() as tg:
                    child = await tg.start(self._run_child, spec)
            except BaseException:  # stopped by a signal: no half-written cache stays behind
                devshell.discard()
                raise
            finally:
                os.close(stdout)
                os.close(stderr)
            self.watchdog.release_group(child.pid)
            status = child.status
        if not launcher.finish_devshell(devshell, status):
            self.log.warning(
                "could not cache the dev shell; the guest starts without it",
                details=str(devshell.errors),
            )

    def _open_share_dirs(self) -> None:
        """Open every share's directory (creating the missing ones) without following links."""
        for share in self.plan.shares:
            existed = share.source.exists()
            self._share_dirs[share.tag] = sharedirs.open_source(
                share.tag,
                share.source,
                create=share.create,
                owner=(share.ids.host_uid, share.ids.host_gid),
                expect_uid=share.inside_share_of_uid,
            )
            if not existed:
                self.log.info("created share directory", share=share.tag, path=str(share.source))

    def _close_share_dirs(self) -> None:
        for fd in self._share_dirs.values():
            os.close(fd)
        self._share_dirs.clear()

    async def run(self) -> int:
        try:
            return await self._run_instance()
        finally:
            self._close_share_dirs()

    async def _run_instance(self) -> int:
        plan = self.plan
        runtime.ensure_base(plan.base_dir)
        runtime.clean_stale(plan.base_dir)
        self._open_share_dirs()
        if plan.env_file is not None:
            launcher.write_env_file(plan.env_file)
        for note in plan.notes:
            self.log.warning(note)
        runtime.create_instance_dir(plan.base_dir, plan.instance)
        self.watchdog.guard_dir(plan.instance_dir)
        self._supervisor_ticks = read_start_ticks(os.getpid())
        notifier = self.host.notifier
        try:
            self._record_state()
            self._open_console_log()
            self.log.info("instance", runtime_dir=str(plan.instance_dir))
            notifier.status(f"starting {plan.instance}")
            try:
                async with anyio.create_task_group() as everything:
                    self._everything = everything.cancel_scope
                    everything.start_soon(self._handle_signals, everything.cancel_scope)
                    if self.host.subreaper or pid1.is_init():
                        pid1.become_subreaper()
                        everything.start_soon(pid1.reap_orphans, self._is_own_child)
                    await everything.start(control.Server(plan.control_socket, self).serve)
                    self.egress = egress.make_proxy(plan.egress)
                    if self.egress is not None and plan.egress.socket_path is not None:
                        self.log.info(
                            "egress allow-list", proxy=plan.egress.proxy_url, log=str(plan.egress.log_path)
                        )
                        await everything.start(self.egress.serve_handoff, plan.egress.socket_path)
                    if plan.devshell is not None:
                        await self._refresh_devshell(plan.devshell)
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
        finally:
            self._stopping("the instance ended")
            runtime.remove_instance_dir(plan.instance_dir)
            if self._console_log is not None:
                self._console_log.close()
            if self.egress is not None:
                self.egress.audit.close()
        return self._exit_code()

    def _exit_code(self) -> int:
        outcome = self.outcome
        if outcome.signal is not None:
            return ExitCode.SIGNAL_BASE + outcome.signal
        if outcome.stopped_by_control:
            return ExitCode.SIGNAL_BASE + signal.SIGTERM
        if outcome.error is not None:
            raise outcome.error
        if outcome.stopped_from_console:
            # Like a stop signal: what the command returned when it was hung up is not its verdict.
            return ExitCode.STOPPED_FROM_CONSOLE
        runner = self.runner
        if runner is not None and runner.status not in (None, 0) and self.report.exit_status is None:
            share_failure = self._share_that_failed_the_runner()
            if share_failure is not None:
                raise share_failure
        if runner is None or runner.status is None:
            raise SupervisorError("the runner never started", exit_code=ExitCode.INTERNAL)
        said = runner.stderr_excerpt()
        said = f" QEMU said: {said}." if said else ""
        if not self.plan.builtin_guest:
            if runner.status != 0:
                # the runner's own words: a microvm.nix script can fail before it execs the hypervisor
                self.log.error(
                    "runner failed", status=describe_status(runner.status), said=runner.stderr_excerpt()
                )
            return exit_code_of(runner.status)
        report = self.report
        problem = report.problem()
        if problem is not None:
            raise SupervisorError(
                f"{problem}. The guest cannot be trusted: run with --verbose to see its console.",
                exit_code=ExitCode.GUEST_FAILED,
            )
        if report.error is not None:
            raise SupervisorError(
                f"the built-in guest failed before running the command: {report.error}. Run with "
                "--verbose to see the guest console and the virtiofsd logs.",
                exit_code=ExitCode.GUEST_FAILED,
            )
        if report.exit_status is not None:
            return report.exit_status
        if runner.status < 0:
            print(
                f"agentvm-supervise: QEMU (pid {runner.pid}) was {describe_status(runner.status)} before "
                "the guest reported a status; nothing is left running.",
                file=sys.stderr,
            )
            return exit_code_of(runner.status)
        overflow = report.overflow()
        if overflow is not None:
            raise SupervisorError(
                f"{overflow}. Run with --verbose to see its console.", exit_code=ExitCode.GUEST_FAILED
            )
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
