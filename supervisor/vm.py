"""One VM instance: the only place that composes task groups.

    instance dir + watchdog
      everything task group      (signals, orphan reaper, control socket, dev shell refresh)
        shares task group        (outer: stopped last)
          virtiofsd[work], virtiofsd[agent-home], virtiofsd[cri-storage]     (shares.py)
          vm task group          (inner: stopped first)
            vm_process (QEMU or a microvm.nix runner), QMP channel, graceful stop, console, KVM watch

Whatever ends first ends everything: the VM process exiting is the normal end; a virtiofsd dying
while the VM still needs it, a signal, `stop`, the console's stop key or a hung-up terminal start
the stop path (lifecycle.py decides what each means). Teardown order is the nesting of the groups;
the exit status is `lifecycle.exit_status` of what was recorded.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import structlog

from supervisor import (
    control,
    devshell_refresh,
    egress,
    graceful,
    kvm_watch,
    launcher,
    pid1,
    runtime,
    sharedirs,
    sshkeys,
    statusport,
    tap,
)
from supervisor.children import Child, ChildSpec, run_child
from supervisor.config import Hypervisor
from supervisor.console.hub import Console, bind_console_socket
from supervisor.console.log import ConsoleLog, open_log
from supervisor.console.terminal import ConsolePty, get_window_size, open_console_pty
from supervisor.egress.proxy import Proxy
from supervisor.errors import SupervisorError
from supervisor.lifecycle import Action, Cause, Lifecycle, Phase, Request, VmEnd, exit_status
from supervisor.notify import Notifier, stop_budget
from supervisor.plan import Plan
from supervisor.qemu import qemu_argv
from supervisor.qmp import QmpClient
from supervisor.shares import ShareDaemons
from supervisor.virtiofsd import bind_vhost_user_socket
from supervisor.watchdog import Watchdog

INSTANCE_ENV = "AGENTVM_INSTANCE"
# `status` shows no "stopped": the control socket is gone by then.
_WIRE_PHASE: dict[Phase, control.Phase] = {
    Phase.STARTING: "starting",
    Phase.RUNNING: "running",
    Phase.STOPPING: "stopping",
    Phase.STOPPED: "stopping",
}


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


@dataclass
class _VmChannels:
    """What the VM process is started with, and what the instance keeps of it."""

    pty: ConsolePty
    size: tuple[int, int] | None
    qmp: socket.socket  # our end of the private QMP channel
    qmp_theirs: socket.socket
    resize: socket.socket  # our end of the guest's resize port
    resize_theirs: socket.socket
    status: socket.socket  # our end of the built-in guest's status port
    status_theirs: socket.socket
    public_qmp: socket.socket | None  # a microvm.nix runner's own -qmp: QEMU binds that one itself
    console: socket.socket  # console.sock's listener

    def close_theirs(self) -> None:
        """The VM process has them: its exit now reads as EOF on the PTY master."""
        self.pty.close_slave()
        self.qmp_theirs.close()
        self.resize_theirs.close()
        self.status_theirs.close()
        if self.public_qmp is not None:
            self.public_qmp.close()

    def close(self) -> None:
        self.pty.close()
        self.qmp.close()
        self.resize.close()
        self.status.close()
        self.console.close()


class Instance:
    def __init__(self, plan: Plan, watchdog: Watchdog, stdio: Stdio, host: Host | None = None) -> None:
        self.plan = plan
        self.watchdog = watchdog
        self.stdio = stdio
        self.host = host if host is not None else Host()
        self.started = time.time()
        self.log = structlog.get_logger().bind(instance=plan.instance)
        self.lifecycle = Lifecycle(on_stopping=self._notify_stopping, log=self.log)
        self.children: list[Child] = []
        self.vm_process: Child | None = None
        self.shutting_down = anyio.Event()  # QEMU reported SHUTDOWN: the guest is powering off
        self.report = statusport.GuestReport()
        self._share_dirs: dict[str, int] = {}  # tag -> the share's open directory (see sharedirs)
        self._state = runtime.StateFile(plan.files, instance=plan.instance, work_dir=plan.work_dir)
        self._shares = ShareDaemons(
            plan,
            run_child=self._run_child,
            env=self._child_env,
            source_fds=self._share_dirs,
            vm=lambda: self.vm_process,
            shutting_down=self.shutting_down,
            fail=self.lifecycle.fail,
            log=self.log,
        )
        self._everything: anyio.CancelScope | None = None
        self._stop_requested = anyio.Event()
        self._console: Console | None = None
        self._console_done = anyio.Event()
        self._console_log: ConsoleLog | None = None
        self.egress: Proxy | None = None  # allowlist mode: the guest's only way out

    # ---- children ----------------------------------------------------------------------------

    def _adopt(self, child: Child) -> None:
        """Called right after each fork: the watchdog and the state file learn the new group."""
        self.watchdog.guard_group(child.pid)
        self.children.append(child)
        self._state.add_group(child.name, child.pid, child.start_ticks)

    async def _run_child(self, spec: ChildSpec, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        await run_child(spec, on_start=self._adopt, task_status=task_status)

    def _child_env(self) -> dict[str, str]:
        # The instance id in every child's environment lets `list`, stale cleanup and tests find
        # a child by instance even when its argv does not name it.
        # No child needs the agent's API key: it goes to the guest through .microvm-env only.
        return launcher.child_environment(os.environ, {INSTANCE_ENV: self.plan.instance})

    def _is_own_child(self, pid: int) -> bool:
        """For the orphan reaper: a child children.py has started and not yet reaped."""
        return any(child.pid == pid and child.status is None for child in self.children)

    # ---- the stop path: every request goes through lifecycle.begin_stop ------------------------

    def _stop(self, cause: Cause) -> None:
        action = self.lifecycle.begin_stop(cause)
        if action is Action.CANCEL_ALL and self._everything is not None:
            self._everything.cancel()
        elif action is Action.GRACEFUL:
            self._stop_requested.set()
        elif action is Action.FORCE and self.vm_process is not None:
            self.vm_process.stop()

    def _notify_stopping(self, cause: str) -> None:
        budget = stop_budget(self.plan.timeouts, self.lifecycle.deadline)
        self.host.notifier.stopping(f"stopping {self.plan.instance}: {cause}", budget=budget)

    async def _handle_signals(self) -> None:
        with anyio.open_signal_receiver(*pid1.STOP_SIGNALS) as signals:
            # Signals that came after the loop started but before this receiver existed.
            early = self.host.stop_signals.take() if self.host.stop_signals is not None else []
            for signum in early:
                self._stop(Cause.signal(signum))
            async for signum in signals:
                self._stop(Cause.signal(signum))

    async def _stop_when_requested(self, vm: Child, stopper: graceful.GracefulStop) -> None:
        await self._stop_requested.wait()
        deadline = self.lifecycle.deadline
        await stopper.stop(
            vm, deadline=deadline if deadline is not None else self.plan.timeouts.graceful_stop
        )

    # ---- the control socket (control.Controlled) ---------------------------------------------

    def control_stop(self, deadline: float | None) -> None:
        self._stop(Cause.control(deadline))

    def control_status(self) -> control.InstanceStatus:
        plan = self.plan
        vm = self.vm_process
        phase = self.lifecycle.phase
        if phase is Phase.RUNNING and vm is not None and vm.exited.is_set():
            phase = Phase.STOPPING  # the VM is gone; teardown is under way
        return control.InstanceStatus(
            instance=plan.instance,
            phase=_WIRE_PHASE[phase],
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
            command=list(plan.command) if plan.command is not None else None,
            console_attached=self._console is not None and self._console.attached is not None,
            stop_cause=self.lifecycle.cause,
            children=[control.child_info(child) for child in self.children],
            shares=[control.share_info(share) for share in plan.shares],
            egress=egress.egress_info(self.egress, plan.egress) if self.egress is not None else None,
        )

    # ---- the VM ------------------------------------------------------------------------------

    def _vm_spec(self, channels: _VmChannels) -> ChildSpec:
        """Our own QEMU command, or a rewritten copy of the microvm.nix runner run by its own shell."""
        plan = self.plan
        private_qmp = channels.qmp_theirs.fileno()
        common: dict[str, Any] = {
            "name": "runner",  # the child's name in `status` and the logs (kept for compatibility)
            "stdin": channels.pty.slave,
            "stdout": channels.pty.slave,
            "env": self._child_env(),
            "kill_grace": plan.timeouts.kill_grace,
        }
        if plan.runner is not None:  # its guest has no resize helper of ours to talk to
            qemu = plan.runner.hypervisor is Hypervisor.QEMU
            script = plan.runner.write(plan.instance_dir, private_qmp if qemu else None)
            return ChildSpec(
                argv=plan.runner.argv(script),
                pass_fds=(private_qmp,) if qemu else (),
                cwd=str(plan.runner.cwd or plan.instance_dir),
                **common,
            )
        assert channels.public_qmp is not None
        fds = (
            private_qmp,
            channels.public_qmp.fileno(),
            channels.resize_theirs.fileno(),
            channels.status_theirs.fileno(),
        )
        spec = plan.qemu_spec(private_qmp_fd=fds[0], public_qmp_fd=fds[1], resize_fd=fds[2], status_fd=fds[3])
        return ChildSpec(argv=qemu_argv(spec), pass_fds=fds, **common)

    def _open_channels(self) -> _VmChannels:
        size = get_window_size(self.stdio.stdin)
        pty = open_console_pty(size)
        qmp, qmp_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        resize, resize_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        status, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        plan = self.plan
        public = bind_vhost_user_socket(plan.qmp_socket) if plan.runner is None else None
        console = bind_console_socket(plan.console_socket)
        return _VmChannels(
            pty, size, qmp, qmp_theirs, resize, resize_theirs, status, status_theirs, public, console
        )

    async def _run_vm(self) -> None:
        plan = self.plan
        if self.lifecycle.record.error is not None:  # a share died while starting: no VM to start
            return
        channels = self._open_channels()
        status_port = statusport.StatusPort(channels.status)
        try:
            async with anyio.create_task_group() as tg:
                try:
                    vm = await tg.start(self._run_child, self._vm_spec(channels))
                finally:
                    channels.close_theirs()
                self.vm_process = vm
                self.lifecycle.vm_started()
                self.log.info("vm started", accel=plan.accel.value, why=plan.accel_reason)
                qmp = self._start_qmp(tg, channels.qmp)
                stopper = graceful.for_hypervisor(
                    plan.hypervisor,
                    qmp=qmp,
                    api=plan.files.api_socket,
                    quit_deadline=plan.timeouts.quit,
                    log=self.log,
                )
                tg.start_soon(self._stop_when_requested, vm, stopper)
                tg.start_soon(self._run_console, channels)
                tg.start_soon(status_port.run)
                tg.start_soon(self._watch_kvm_once_up, qmp)
                await vm.exited.wait()
                self.lifecycle.vm_exited(vm.describe_status())
                # The guest's last words are still in the PTY; the proxy sees EOF once they are out.
                with anyio.move_on_after(1.0):
                    await self._console_done.wait()
                tg.cancel_scope.cancel()
            if plan.builtin_guest:
                self.report = status_port.report()
        finally:
            status_port.close()
            channels.close()

    async def _watch_kvm_once_up(self, qmp: QmpClient | None) -> None:
        """Watch the KVM device once QEMU answers on QMP (at once without QMP): the watch is not
        part of the start, and setting it up (pyudev) would compete with QEMU and virtiofsd for the
        CPU meanwhile, and delay the teardown of a runner that exits at once (issue 17)."""
        if qmp is not None:
            await qmp.ready.wait()
            if qmp.closed.is_set():
                return
        await kvm_watch.report_changes(self.plan.kvm_device, self.plan.accel)

    def _start_qmp(self, tg: anyio.abc.TaskGroup, ours: socket.socket) -> QmpClient | None:
        """QEMU's private QMP channel; READY=1 once it answers (spawned is not ready)."""
        plan = self.plan
        if plan.hypervisor is not Hypervisor.QEMU:  # cloud-hypervisor: started is all we can know
            self.host.notifier.ready(f"running {plan.instance} ({plan.accel.value}, pid {os.getpid()})")
            return None
        qmp = QmpClient(ours, self._on_qmp_event)
        tg.start_soon(qmp.run)
        tg.start_soon(self._announce_ready, qmp)
        return qmp

    async def _announce_ready(self, qmp: QmpClient) -> None:
        await qmp.ready.wait()
        if not qmp.closed.is_set() and self.lifecycle.cause is None:
            plan = self.plan
            self.log.info("ready")
            self.host.notifier.ready(f"running {plan.instance} ({plan.accel.value}, pid {os.getpid()})")

    def _on_qmp_event(self, event: str, data: dict[str, Any]) -> None:
        self.log.info("qemu event", qemu_event=event, **{k: str(v) for k, v in data.items()})
        if event == "SHUTDOWN":
            self.shutting_down.set()

    # ---- the console -------------------------------------------------------------------------

    async def _run_console(self, channels: _VmChannels) -> None:
        channels.resize.setblocking(False)
        self._console = Console(
            channels.pty,
            instance=self.plan.instance,
            settings=self.plan.console,
            size=channels.size,
            on_stop=lambda: self._stop(Cause(Request.CONSOLE_KEY)),
            on_hangup=lambda: self._stop(Cause(Request.HANGUP)),
            on_terminal_reset=self.watchdog.guard_terminal_modes,
            resize_port=channels.resize,
            log=self._console_log,
        )
        try:
            await self._console.run(
                stdin_fd=self.stdio.stdin, stdout_fd=self.stdio.stdout, listener=channels.console
            )
        finally:
            self._console_done.set()

    def _open_console_log(self) -> None:
        settings = self.plan.console
        if settings.log_dir is not None:
            self._console_log = open_log(
                settings.log_dir, self.plan.instance, max_bytes=settings.log_max_bytes, keep=settings.log_keep
            )
            self.log.info("console log", path=str(self._console_log.path))

    # ---- the whole instance ------------------------------------------------------------------

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

    def _prepare(self) -> None:
        """Before the instance dir exists: the host side the plan asked for."""
        plan = self.plan
        runtime.ensure_base(plan.base_dir)
        runtime.clean_stale(plan.base_dir)
        self._open_share_dirs()
        host_key = sshkeys.public_key_of(plan.ssh, self._share_dirs)  # made once per VM
        if host_key is not None:
            self.log.info("ssh host key", key=host_key)
        if plan.env_file is not None:
            launcher.write_env_file(plan.env_file)
        for note in plan.notes:
            self.log.warning(note)

    async def _run_groups(self) -> None:
        """The task groups, outermost first; each ends by cancelling what it started."""
        plan = self.plan
        async with anyio.create_task_group() as everything:
            self._everything = everything.cancel_scope
            everything.start_soon(self._handle_signals)
            if self.host.subreaper or pid1.is_init():
                pid1.become_subreaper()
                everything.start_soon(pid1.reap_orphans, self._is_own_child)
            await everything.start(control.Server(plan.control_socket, self).serve)
            self.egress = egress.make_proxy(plan.egress)
            if self.egress is not None and plan.egress.socket_path is not None:
                self.log.info("egress allow-list", proxy=plan.egress.proxy_url, log=str(plan.egress.log_path))
                await everything.start(self.egress.serve_handoff, plan.egress.socket_path)
            if plan.devshell is not None:
                await self._refresh_devshell(plan.devshell)
            # The taps (tap networks) outlive the VM and its daemons, and go before the instance does.
            owner = tap.current_owner(plan.instance)
            async with (
                tap.attached(plan.taps, owner, self.watchdog, self.log),
                anyio.create_task_group() as shares,
            ):
                await self._shares.start(shares)
                await self._run_vm()
                shares.cancel_scope.cancel()
            everything.cancel_scope.cancel()

    async def _refresh_devshell(self, devshell: launcher.Devshell) -> None:
        child = await devshell_refresh.refresh_devshell(
            devshell,
            run_child=self._run_child,
            env=self._child_env(),
            kill_grace=self.plan.timeouts.kill_grace,
            log=self.log,
        )
        if child is not None:
            self.watchdog.release_group(child.pid)

    async def run(self) -> int:
        try:
            return await self._run_instance()
        finally:
            self._close_share_dirs()

    async def _run_instance(self) -> int:
        plan = self.plan
        self._prepare()
        runtime.create_instance_dir(plan.base_dir, plan.instance)
        self.watchdog.guard_dir(plan.instance_dir)
        try:
            self._state.begin()
            self._open_console_log()
            self.log.info("instance", runtime_dir=str(plan.instance_dir))
            self.host.notifier.status(f"starting {plan.instance}")
            try:
                await self._run_groups()
            except SupervisorError as exc:
                self.lifecycle.fail(exc)
            except BaseExceptionGroup as group:  # a SupervisorError raised in a child task
                errors, rest = group.split(SupervisorError)
                if rest is not None:
                    raise rest from None
                if errors is not None:
                    self.lifecycle.fail(_first_error(errors))
        finally:
            self.lifecycle.ended()
            runtime.remove_instance_dir(plan.instance_dir)
            if self._console_log is not None:
                self._console_log.close()
            if self.egress is not None:
                self.egress.audit.close()
        return self._exit_code()

    def _exit_code(self) -> int:
        vm = self.vm_process
        ended = (
            VmEnd(vm.pid, vm.status, vm.stderr_excerpt())
            if vm is not None and vm.status is not None
            else None
        )
        verdict = exit_status(
            self.lifecycle.record,
            ended,
            self.report,
            builtin_guest=self.plan.builtin_guest,
            failed_share=self._shares.failed_share(),
        )
        if verdict.vm_failed and vm is not None:
            # the runner's own words: a microvm.nix script can fail before it execs the hypervisor
            self.log.error("runner failed", status=vm.describe_status(), said=vm.stderr_excerpt())
        if verdict.notice is not None:
            print(verdict.notice, file=sys.stderr)
        if verdict.error is not None:
            raise verdict.error
        return verdict.code


def _first_error(group: BaseExceptionGroup[SupervisorError]) -> SupervisorError:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        return exc
    raise AssertionError("empty exception group")
