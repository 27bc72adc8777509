"""children.run_child with real processes: groups, grace, reaping, stderr, parent death."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from supervisor.children import Child, ChildSpec, exit_code_of, run_child
from supervisor.errors import SupervisorError
from supervisor.readiness import wait_socket

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":
                members.append(int(entry.name))
    return members


async def test_exit_status_and_stderr_are_reported() -> None:
    spec = ChildSpec(name="t", argv=["sh", "-c", "echo first >&2; echo out; echo last >&2; exit 3"])
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, spec)
        await child.exited.wait()
    assert child.status == 3
    assert list(child.stderr_tail) == ["first", "out", "last"]  # stdout is logged too by default


async def test_child_is_its_own_session_and_group() -> None:
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, ChildSpec(name="t", argv=["sleep", "30"]))
        assert os.getpgid(child.pid) == child.pid
        assert os.getsid(child.pid) == child.pid
        tg.cancel_scope.cancel()
    assert child.status == -signal.SIGTERM


async def test_cancelling_kills_the_whole_group_not_just_the_leader() -> None:
    # The leader forks a helper (like virtiofsd's sandbox child) and waits for it.
    spec = ChildSpec(name="t", argv=["sh", "-c", "sleep 300 & wait"])
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, spec)
        with anyio.fail_after(5):
            while len(_group_members(child.pid)) < 2:
                await anyio.sleep(0.01)
        members = _group_members(child.pid)
        tg.cancel_scope.cancel()
    assert child.exited.is_set()
    # SIGKILL has been sent to the group; dying takes a scheduling slot on a busy machine.
    with anyio.move_on_after(5):
        while [pid for pid in members if _alive(pid)]:
            await anyio.sleep(0.01)
    assert [pid for pid in members if _alive(pid)] == []


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    script = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); time.sleep(300)"
    spec = ChildSpec(name="stubborn", argv=[sys.executable, "-c", script], kill_grace=0.3)
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, spec)
        with anyio.fail_after(10):
            while "armed" not in child.stderr_tail:
                await anyio.sleep(0.01)
        started = time.monotonic()
        child.stop()
        await child.exited.wait()
        elapsed = time.monotonic() - started
    assert child.status == -signal.SIGKILL
    assert 0.25 < elapsed < 5
    assert exit_code_of(child.status) == 137


async def test_leftover_group_members_die_when_the_leader_exits() -> None:
    spec = ChildSpec(name="t", argv=["sh", "-c", "sleep 300 & echo $! >&2; exit 0"])
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, spec)
        await child.exited.wait()
    orphan = int(child.stderr_tail[0])
    with anyio.fail_after(5):
        while _alive(orphan):
            await anyio.sleep(0.01)


async def test_missing_binary_is_a_clear_error() -> None:
    with pytest.RaisesGroup(SupervisorError, flatten_subgroups=True) as raised:
        async with anyio.create_task_group() as tg:
            await tg.start(run_child, ChildSpec(name="virtiofsd[work]", argv=["/nonexistent/virtiofsd"]))
    [error] = raised.value.exceptions
    assert "virtiofsd[work]" in str(error) and "/nonexistent/virtiofsd" in str(error)


def test_children_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: even SIGKILL of the supervisor takes its children along."""
    program = textwrap.dedent(
        """
        import anyio, sys
        from supervisor import logs
        from supervisor.children import ChildSpec, run_child

        logs.configure(json=True)

        async def main():
            async with anyio.create_task_group() as tg:
                child = await tg.start(run_child, ChildSpec(name="t", argv=["sleep", "300"]))
                print(child.pid, flush=True)
                await anyio.sleep(300)

        anyio.run(main)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", program],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path.cwd())},
    )
    assert parent.stdout is not None
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    deadline = time.monotonic() + 5
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(child_pid)


async def test_socket_readiness_seen_from_inotify(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    script = f"import socket, time; time.sleep(0.3); s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); s.listen(); time.sleep(300)"
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, ChildSpec(name="t", argv=[sys.executable, "-c", script]))
        waited = await wait_socket(path, child, timeout=20, owner="test daemon")
        assert 0.2 < waited < 20
        tg.cancel_scope.cancel()


async def test_socket_readiness_loses_to_the_childs_death(tmp_path: Path) -> None:
    spec = ChildSpec(name="t", argv=["sh", "-c", "echo cannot open shared dir >&2; exit 1"])
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, spec)
        with pytest.raises(SupervisorError) as raised:
            await wait_socket(tmp_path / "never.sock", child, timeout=20, owner="virtiofsd for share 'work'")
    message = str(raised.value)
    assert "virtiofsd for share 'work'" in message and "status 1" in message
    assert "cannot open shared dir" in message and str(tmp_path / "never.sock") in message


async def test_socket_readiness_deadline(tmp_path: Path) -> None:
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, ChildSpec(name="t", argv=["sleep", "300"]))
        with pytest.raises(SupervisorError) as raised:
            await wait_socket(tmp_path / "never.sock", child, timeout=0.3, owner="virtiofsd for share 'home'")
        tg.cancel_scope.cancel()
    assert "within 0.3 s" in str(raised.value) and "timeouts.socket-ready" in str(raised.value)


async def test_a_regular_file_with_the_sockets_name_is_not_readiness(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    script = f"import socket, time; open({str(path)!r}, 'w').close(); time.sleep(0.2); import os; os.unlink({str(path)!r}); s = socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); s.listen(); time.sleep(300)"
    async with anyio.create_task_group() as tg:
        child: Child = await tg.start(run_child, ChildSpec(name="t", argv=[sys.executable, "-c", script]))
        await wait_socket(path, child, timeout=20, owner="t")
        assert path.is_socket()
        tg.cancel_scope.cancel()


def test_the_kernel_refuses_a_unix_socket_path_over_its_limit() -> None:
    # The AF_UNIX limit the runtime module enforces.
    with socket.socket(socket.AF_UNIX) as sock, pytest.raises(OSError):
        sock.bind("/tmp/" + "x" * 110)
