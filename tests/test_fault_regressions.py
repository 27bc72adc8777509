"""Regression tests for the bugs the fault-injection suite found, one per bug, named after it."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from supervisor import runtime
from supervisor.children import Child, ChildSpec, run_child
from supervisor.errors import ExitCode, SupervisorError
from supervisor.qmp import QmpClient, QmpError
from supervisor.virtiofsd import bind_vhost_user_socket
from tests.faults import Player, check, fixed_case, report
from tests.support import REPO, as_user, base_env, user_ids

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def case_root(shared_tmp: Path) -> Iterator[Path]:
    yield shared_tmp


def _play(root: Path, test_user: str | None = None, **fields: object) -> None:
    case = fixed_case(**fields)
    result = Player(case, root, user_ids(test_user) if test_user else None).play()
    problems = check(case, result)
    assert not problems, report(case, result, problems)


async def test_failing_on_start_hook_still_stops_and_reaps_the_child() -> None:
    """A state file that could not be written (on_start raising) left the fresh child running."""
    started: list[Child] = []

    def refuse(child: Child) -> None:
        started.append(child)
        raise SupervisorError("cannot write the state file", exit_code=ExitCode.CANT_CREATE)

    with pytest.raises(ExceptionGroup) as caught:
        async with anyio.create_task_group() as tg:
            spec = ChildSpec(name="sleeper", argv=["sleep", "600"], kill_grace=0.5)
            await tg.start(functools.partial(run_child, spec, on_start=refuse))
    assert caught.group_contains(SupervisorError)
    [child] = started
    assert child.exited.is_set() and child.status is not None
    assert not Path(f"/proc/{child.pid}").exists()  # reaped, not a zombie


def test_state_file_write_failure_is_a_clear_error_not_an_internal_one(tmp_path: Path) -> None:
    state = runtime.InstanceState(instance="x", supervisor_pid=1, supervisor_start_ticks=1, created=0.0)
    with pytest.raises(SupervisorError) as caught:
        runtime.write_state(tmp_path / "removed-instance-dir", state)
    assert caught.value.exit_code == ExitCode.CANT_CREATE
    assert "removed-instance-dir" in caught.value.message


def test_socket_bind_failure_is_a_clear_error_not_an_internal_one(tmp_path: Path) -> None:
    with pytest.raises(SupervisorError) as caught:
        bind_vhost_user_socket(tmp_path / "gone" / "work.sock")
    assert caught.value.exit_code == ExitCode.CANT_CREATE
    assert "gone/work.sock" in caught.value.message


def test_read_only_instance_dir_is_still_removed(shared_tmp: Path, test_user: str) -> None:
    """rmtree(ignore_errors=True) silently left a dir whose mode was changed to 0500."""
    uid, gid = user_ids(test_user)
    instance = shared_tmp / "agentvm-0000"
    instance.mkdir()
    (instance / "work.sock").touch()
    for path in (shared_tmp, instance, instance / "work.sock"):
        os.chown(path, uid, gid)
    instance.chmod(0o500)
    code = f"import pathlib, supervisor.runtime as r; r.remove_instance_dir(pathlib.Path({str(instance)!r}))"
    subprocess.run(as_user(test_user, [sys.executable, "-c", code]), env=base_env(), check=True, cwd=REPO)
    assert not instance.exists()


async def test_qemu_exiting_before_the_qmp_greeting_is_not_an_internal_error() -> None:
    """QmpClient.run raised BrokenResourceError when QEMU died before our qmp_capabilities."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.close()
    client = QmpClient(ours, lambda _event, _data: None)
    with anyio.fail_after(10):
        await client.run()
    assert client.closed.is_set()
    with pytest.raises(QmpError):
        await client.execute("system_powerdown")


def test_custom_runner_failure_shows_what_the_runner_said(case_root: Path) -> None:
    """With a custom kernel, a QEMU refusing a bad argument was reported only as 'status 1'."""
    _play(case_root, fault="bad-arg", phase="start")


@pytest.mark.parametrize("socket_mode", ["fd", "path"])
@pytest.mark.parametrize("builtin", [False, True])
def test_virtiofsd_dying_before_qemu_connects_names_the_share(
    case_root: Path, guest_assets: object, socket_mode: str, builtin: bool
) -> None:
    """QEMU's 'Connection refused' was the only message when a virtiofsd died before QEMU started."""
    _play(
        case_root,
        fault="exits-early",
        target="virtiofsd:home",
        phase="start",
        virtiofsd_behaviour="home=exit-early",
        socket_mode=socket_mode,
        builtin=builtin,
    )


@pytest.mark.parametrize("builtin", [False, True])
def test_virtiofsd_dying_right_after_creating_its_socket_names_the_share(
    case_root: Path, guest_assets: object, builtin: bool
) -> None:
    """A share that died while another was still starting was ignored (no runner yet), so the only
    message was QEMU's 'Connection refused' on its socket."""
    _play(
        case_root,
        fault="exits-early",
        target="virtiofsd:home",
        phase="start",
        virtiofsd_behaviour="home=exit-after-listen,data=slow-socket",
        socket_mode="path",
        builtin=builtin,
    )


@pytest.mark.parametrize("builtin", [False, True])
def test_path_mode_waits_for_the_socket_to_listen_not_just_to_exist(
    case_root: Path, guest_assets: object, builtin: bool
) -> None:
    """A virtiofsd stopped (or preempted) between bind() and listen() looked ready to inotify, and
    QEMU's connect was refused (found by a SIGSTOP during start in --socket-path mode)."""
    _play(
        case_root, phase="start", socket_mode="path", virtiofsd_behaviour="home=slow-listen", builtin=builtin
    )


def test_ctrl_c_while_python_imports_the_supervisor_exits_130_without_a_traceback() -> None:
    # An import hook raising KeyboardInterrupt stands in for Ctrl-C landing during the imports.
    code = (
        "import builtins, runpy\n"
        "real = builtins.__import__\n"
        "def hook(name, *args, **kwargs):\n"
        "    if name == 'structlog':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = hook\n"
        "runpy.run_module('supervisor', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=base_env(), capture_output=True, text=True, check=False, cwd=REPO
    )
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr
