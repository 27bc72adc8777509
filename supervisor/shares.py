"""The shares' virtiofsd daemons: started before the VM, each watched until it exits.

A virtiofsd that dies while the VM needs it ends the instance (exit 75): I/O on its share would
hang the guest. One that exits cleanly while QEMU is alive is normal during a shutdown (QEMU closes
the vhost-user connection before its own exit), so its death is confirmed first.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
import anyio.abc

from supervisor import readiness
from supervisor.children import Child, ChildSpec, describe_status
from supervisor.config import SocketMode
from supervisor.errors import ExitCode, SupervisorError
from supervisor.plan import Plan
from supervisor.virtiofsd import ShareSpec, bind_vhost_user_socket, virtiofsd_argv

# How long a virtiofsd's clean exit waits for QEMU to confirm the VM is ending.
SHARE_EXIT_CONFIRM_S = 2.0


class ShareDaemons:
    """One virtiofsd per share, children of the shares task group.

    `vm` is the VM process once it runs (None while starting), `shutting_down` QEMU's SHUTDOWN
    event, `fail` records an error as the instance's.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        run_child: Callable[..., Coroutine[Any, Any, None]],
        env: Callable[[], dict[str, str]],
        source_fds: Mapping[str, int],
        vm: Callable[[], Child | None],
        shutting_down: anyio.Event,
        fail: Callable[[SupervisorError], None],
        log: Any,
    ) -> None:
        self._plan = plan
        self._run_child = run_child
        self._env = env
        self._source_fds = source_fds  # tag -> the share's directory, opened link-free (sharedirs)
        self._vm = vm
        self._shutting_down = shutting_down
        self._fail = fail
        self._log = log
        self._started: list[tuple[Child, ShareSpec]] = []

    async def start(self, tg: anyio.abc.TaskGroup) -> None:
        """Start every daemon in `tg` and return once each one's socket is there."""
        if self._plan.socket_mode is SocketMode.FD:
            for share in self._plan.shares:
                listener = bind_vhost_user_socket(share.socket_path)
                try:
                    await self._start_one(tg, share, listener.fileno())
                finally:
                    listener.close()  # virtiofsd holds it now; if it dies, QEMU's connect fails
            return
        for share in self._plan.shares:
            await self._start_one(tg, share, None)
        async with anyio.create_task_group() as waits:
            for child, share in self._started:
                waits.start_soon(self._wait_socket, child, share)

    def failed_share(self) -> SupervisorError | None:
        """A virtiofsd that died on its own explains a VM process that failed (it could not connect).

        The share's watcher usually says so first; this covers the race where the VM's exit was
        seen first and teardown cancelled the watcher before it ran.
        """
        for child, share in self._started:
            if child.status not in (None, 0) and not child.stopped_by_us:
                return _share_error(child, share, early=True)
        return None

    async def _start_one(self, tg: anyio.abc.TaskGroup, share: ShareSpec, fd: int | None) -> None:
        child: Child = await tg.start(self._run_child, self._spec(share, fd))
        self._started.append((child, share))
        tg.start_soon(self._watch, child, share)

    def _spec(self, share: ShareSpec, fd: int | None) -> ChildSpec:
        plan = self._plan
        return ChildSpec(
            name=f"virtiofsd[{share.tag}]",
            argv=virtiofsd_argv(
                plan.virtiofsd_binary,
                share,
                socket_mode=plan.socket_mode,
                fd=fd,
                sandbox=plan.sandbox,
                extra_args=list(plan.virtiofsd_extra_args),
                source_fd=self._source_fds[share.tag],
            ),
            pass_fds=(self._source_fds[share.tag], *((fd,) if fd is not None else ())),
            env=self._env(),
            kill_grace=plan.timeouts.kill_grace,
        )

    async def _wait_socket(self, child: Child, share: ShareSpec) -> None:
        waited = await readiness.wait_socket(
            share.socket_path,
            child,
            timeout=self._plan.timeouts.socket_ready,
            owner=f"virtiofsd for share '{share.tag}'",
        )
        self._log.info("share ready", share=share.tag, waited_ms=round(waited * 1000, 1))

    async def _watch(self, child: Child, share: ShareSpec) -> None:
        await child.exited.wait()
        vm = self._vm()
        if self._shutting_down.is_set():
            return
        if vm is not None and vm.exited.is_set() and (child.status == 0 or vm.status == 0):
            return  # it followed QEMU out, or it died after the VM had ended well
        # Dying before QEMU could use it is the cause of what QEMU does next (it cannot connect):
        # name the share, not QEMU's "Connection refused".
        early = vm is None or vm.exited.is_set()
        if vm is not None and not early and child.status == 0:
            await self._confirm_vm_ending(vm)
            if vm.exited.is_set() or self._shutting_down.is_set():
                return
        error = _share_error(child, share, early=early)
        self._fail(error)
        self._log.error("share daemon died; stopping the VM", share=share.tag)
        if vm is None:
            raise error  # still starting: this ends the start
        vm.stop()  # QEMU would hang on the dead share, even during the guest's own power-off

    async def _confirm_vm_ending(self, vm: Child) -> None:
        """Wait briefly for the VM process's exit or a SHUTDOWN event, whichever comes first."""
        with anyio.move_on_after(SHARE_EXIT_CONFIRM_S):
            async with anyio.create_task_group() as tg:

                async def vm_ends() -> None:
                    await vm.exited.wait()
                    tg.cancel_scope.cancel()

                async def shutdown_seen() -> None:
                    await self._shutting_down.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(vm_ends)
                tg.start_soon(shutdown_seen)


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
