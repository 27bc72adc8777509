"""The graceful stop, one protocol for both hypervisors: ask the guest to power off, a deadline,
ask the hypervisor to quit, a deadline; `run_child`'s group kill follows if both pass.

- QEMU (ours, or a microvm.nix QEMU runner): QMP `system_powerdown`, then `quit`, on the private
  QMP channel;
- cloud-hypervisor (a microvm.nix runner): `vm.power-button`, then `vmm.shutdown`, on its API socket.

The plan says which hypervisor runs the VM (`Plan.hypervisor`); the instance only calls `stop`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import anyio

from supervisor.children import Child
from supervisor.config import Hypervisor
from supervisor.qmp import QmpClient, QmpError

API_TIMEOUT = 5.0  # one request on cloud-hypervisor's API


class GracefulStop(Protocol):
    async def stop(self, vm: Child, *, deadline: float) -> None:
        """Power the guest off within `deadline`, else quit the hypervisor, else kill the VM's group."""
        ...


class QmpStop:
    def __init__(self, qmp: QmpClient, *, quit_deadline: float, log: Any) -> None:
        self._qmp = qmp
        self._quit_deadline = quit_deadline
        self._log = log

    async def stop(self, vm: Child, *, deadline: float) -> None:
        # Each step has its deadline around the QMP call too: a QEMU that never finished the
        # QMP handshake must not hold the stop path forever.
        try:
            with anyio.move_on_after(deadline):
                await self._qmp.execute("system_powerdown")
                self._log.info("asked the guest to power off", deadline_s=deadline)
                await vm.exited.wait()
                return
            self._log.warning("the guest did not power off in time; quitting QEMU")
            with anyio.move_on_after(self._quit_deadline):
                await self._qmp.execute("quit")
                await vm.exited.wait()
                return
        except QmpError as exc:
            self._log.info("QMP unavailable for a graceful stop", reason=str(exc))
        vm.stop()


class CloudHypervisorStop:
    def __init__(self, api: Path, *, quit_deadline: float, log: Any) -> None:
        self._api = api
        self._quit_deadline = quit_deadline
        self._log = log

    async def stop(self, vm: Child, *, deadline: float) -> None:
        steps = (("vm.power-button", deadline), ("vmm.shutdown", self._quit_deadline))
        for endpoint, step_deadline in steps:
            try:
                status = await ch_api_put(self._api, endpoint, timeout=min(step_deadline, API_TIMEOUT))
            except ApiError as exc:
                self._log.info("cloud-hypervisor's API unavailable for a graceful stop", reason=str(exc))
                break
            self._log.info(
                "asked cloud-hypervisor", endpoint=endpoint, status=status, deadline_s=step_deadline
            )
            with anyio.move_on_after(step_deadline):
                await vm.exited.wait()
                return
            self._log.warning("cloud-hypervisor did not exit in time", endpoint=endpoint)
        vm.stop()


def for_hypervisor(
    hypervisor: Hypervisor, *, qmp: QmpClient | None, api: Path, quit_deadline: float, log: Any
) -> GracefulStop:
    if hypervisor is Hypervisor.CLOUD_HYPERVISOR:
        return CloudHypervisorStop(api, quit_deadline=quit_deadline, log=log)
    if qmp is None:
        raise AssertionError("a QEMU VM without its private QMP channel")
    return QmpStop(qmp, quit_deadline=quit_deadline, log=log)


# ---- cloud-hypervisor's API ----------------------------------------------------------------------


class ApiError(Exception):
    pass


async def ch_api_put(socket_path: Path, endpoint: str, *, timeout: float = 5.0) -> int:
    """PUT /api/v1/ENDPOINT on cloud-hypervisor's API socket; returns the HTTP status."""
    request = (
        f"PUT /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_unix(socket_path) as stream:
                await stream.send(request)
                received = b""
                while b"\r\n" not in received:
                    try:
                        received += await stream.receive()
                    except anyio.EndOfStream:
                        break
    except (OSError, TimeoutError, anyio.BrokenResourceError) as exc:
        raise ApiError(f"{endpoint} on {socket_path}: {exc}") from None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    if not match:
        raise ApiError(f"{endpoint} on {socket_path}: not an HTTP reply: {received[:80]!r}")
    return int(match.group(1))
