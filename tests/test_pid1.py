"""PID-1 duty: the supervisor as init of a fresh PID namespace with no TTY, and the orphan reaper.

The namespace tests run `unshare --pid --fork --mount-proc agentvm-supervise run ...` with stdin
/dev/null and pipes for stdout/stderr, the way a container engine starts an entrypoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from supervisor import guest
from tests.container_support import (
    Launched,
    fake_runner_config,
    find_by_cmdline,
    in_new_pid_namespace,
    ns_pid,
    proc_state,
    zombie_children,
)
from tests.support import base_env, leftovers, supervisor_argv, wait_until_gone

# ---- the orphan reaper on its own ------------------------------------------------------------

REAPER_PROGRAM = textwrap.dedent(
    """
    import anyio, functools, json, sys
    from supervisor import logs, pid1
    from supervisor.children import ChildSpec, run_child

    logs.configure(json=True)
    pid1.become_subreaper()
    children = []

    def adopt(child):
        children.append(child)

    def is_ours(pid):
        return any(c.pid == pid and c.status is None for c in children)

    # Each child orphans a grandchild (reparented to us; in its own session, so that it outlives
    # the child's process group) and exits at about the same time as it. The child lives at least
    # 0.1 s: run_child SIGKILLs the group its leader leaves, and a grandchild that had not reached
    # setsid yet went with it (status -9).
    script = "(setsid sh -c 'sleep 0.$(($$ % 5)); exit 9' &) ; sleep 0.$(($$ % 5 + 1)); exit $(($$ % 50))"

    async def main():
        async with anyio.create_task_group() as tg:
            tg.start_soon(pid1.reap_orphans, is_ours)
            async with anyio.create_task_group() as runs:
                for _ in range(int(sys.argv[1])):
                    spec = ChildSpec(name="t", argv=["sh", "-c", script])
                    runs.start_soon(functools.partial(run_child, spec, on_start=adopt))
            await anyio.sleep(1.5)  # the last orphans exit
            tg.cancel_scope.cancel()
        print(json.dumps([[c.pid, c.status] for c in children]), flush=True)

    anyio.run(main)
    """
)


def test_reaper_reaps_orphans_and_never_steals_our_childrens_status() -> None:
    """Popen must get each child's real status (a stolen one reads as 0), orphans must all go."""
    result = subprocess.run(
        [sys.executable, "-c", REAPER_PROGRAM, "40"],
        capture_output=True,
        text=True,
        env=base_env(),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout)
    assert len(statuses) == 40
    for pid, status in statuses:
        assert status == pid % 50, (pid, status)  # each child's own `exit $$ % 50`
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    orphans = [event for event in events if event["event"] == "reaped an adopted orphan"]
    assert len(orphans) == 40
    assert {event["status"] for event in orphans} == {9}


# ---- as PID 1 of a PID namespace --------------------------------------------------------------


def test_pid1_reaps_an_orphaned_grandchild(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    config = fake_runner_config(tmp_path, "orphan")
    sup = Launched(
        in_new_pid_namespace([*supervisor_argv(), "run", "--config", str(config)]),
        tmp_path,
        env={"FAKE_QEMU_ORPHAN": "1.5"},
    )
    try:
        init = sup.namespace_init()
        sup.read_until(b"RUNNER-UP")
        orphan = find_by_cmdline(b"agentvm-orphan")
        inner_pid = ns_pid(orphan)
        # Its parent died at once: it was adopted by the namespace's init, the supervisor.
        assert int(Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[1]) == init
        deadline = time.monotonic() + 20
        while proc_state(orphan) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc_state(orphan) is None, f"orphan {orphan} is still there in state {proc_state(orphan)}"
        assert zombie_children(init) == []
        wanted = {"pid": inner_pid, "status": 3}

        def reaped() -> list[dict[str, object]]:
            events = [e for e in sup.events() if e["event"] == "reaped an adopted orphan"]
            return [{"pid": e["pid"], "status": e["status"]} for e in events]

        while wanted not in reaped() and time.monotonic() < deadline:  # logged just after the reap
            time.sleep(0.02)
        assert wanted in reaped()
        os.kill(init, signal.SIGTERM)
        assert sup.wait() == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()
    assert leftovers(tmp_path / "rt") == []


def test_subreaper_flag_reaps_orphans_outside_a_namespace(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    config = fake_runner_config(tmp_path, "subreaper")
    sup = Launched(
        [*supervisor_argv(), "run", "--subreaper", "--config", str(config)],
        tmp_path,
        env={"FAKE_QEMU_ORPHAN": "1"},
    )
    try:
        sup.read_until(b"RUNNER-UP")
        orphan = find_by_cmdline(b"agentvm-orphan")
        assert int(Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[1]) == sup.proc.pid
        deadline = time.monotonic() + 20
        while proc_state(orphan) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc_state(orphan) is None
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.wait() == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()
    # Also virtiofsd's sandboxed child, orphaned when its parent exits first at teardown.
    reaped = [event for event in sup.events() if event["event"] == "reaped an adopted orphan"]
    assert {"pid": orphan, "status": 3} in [{"pid": e["pid"], "status": e["status"]} for e in reaped]


def test_pid1_handles_sigterm_before_the_event_loop(tmp_path: Path) -> None:
    """As PID 1 a signal without a handler is dropped: the handler must exist from the start.
    A FIFO as the config file holds the supervisor in its very first steps."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    sup = Launched(in_new_pid_namespace([*supervisor_argv(), "run", "--config", str(fifo)]), tmp_path)
    try:
        init = sup.namespace_init()
        deadline = time.monotonic() + 10
        while b"python" not in Path(f"/proc/{init}/cmdline").read_bytes() or proc_state(init) != "S":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # well inside open(FIFO)
        os.kill(init, signal.SIGTERM)
        assert sup.wait(timeout=10) == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()


# Docker's default capability set: no CAP_SYS_ADMIN, so virtiofsd's "namespace" sandbox is out.
DOCKER_CAPS = (
    "-all,+chown,+dac_override,+fsetid,+fowner,+mknod,+net_raw,+setgid,+setuid,+setfcap,+setpcap,"
    "+net_bind_service,+sys_chroot,+kill,+audit_write"
)


@pytest.mark.vm
def test_pid1_with_container_capabilities_passes_the_guest_commands_status_through(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    """As the README's Containerfile has it: PID 1, no TTY, Docker's capabilities, chroot sandbox."""
    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, 1234, 1234)  # the project dir's owner, as the container sees it
    config = tmp_path / "container.toml"
    config.write_text('[virtiofsd]\nsandbox = "chroot"\n')
    sup = Launched(
        in_new_pid_namespace(
            ["setpriv", "--bounding-set", DOCKER_CAPS, "--inh-caps", "-all", "--",
             *supervisor_argv(), "run", "--config", str(config), "--name", "pid1",
             "--work-dir", str(work), "--agent-home", str(tmp_path / "home"),
             "--runtime-dir", str(tmp_path / "rt"),
             "--", "sh", "-c", "echo from-the-guest > /work/f; cat /work/f; exit 7"]
        ),
        tmp_path,
    )  # fmt: skip
    assert sup.wait() == 7, sup.stderr()
    # No TTY: stdout is the guest's console and nothing else, stderr is JSON lines only.
    assert sup.output == b"from-the-guest\r\n"
    assert all(line.startswith("{") for line in sup.stderr().splitlines()), sup.stderr()
    info = (work / "f").stat()
    assert (info.st_uid, info.st_gid) == (1234, 1234)  # the guest's uid 1000 became the owner's
    assert wait_until_gone("pid1") == []
    assert leftovers(tmp_path / "rt") == []


@pytest.mark.vm
def test_pid1_sigterm_takes_the_graceful_path(guest_assets: guest.GuestAssets, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config = tmp_path / "quick.toml"
    config.write_text("[timeouts]\ngraceful-stop = 2\n")
    sup = Launched(
        in_new_pid_namespace(
            [*supervisor_argv(), "run", "--config", str(config), "--name", "pid1-term",
             "--work-dir", str(work), "--agent-home", str(tmp_path / "home"),
             "--runtime-dir", str(tmp_path / "rt"), "--", "sh", "-c",
             "trap 'echo hung-up > /work/graceful; exit 0' HUP; echo GUEST-READY; while :; do sleep 1; done"]
        ),
        tmp_path,
    )  # fmt: skip
    try:
        init = sup.namespace_init()
        sup.read_until(b"GUEST-READY")
        os.kill(init, signal.SIGTERM)
        assert sup.wait() == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()
    events = [event["event"] for event in sup.events()]
    assert "stopping on signal" in events
    assert "asked the guest to power off" in events  # QMP system_powerdown came first
    assert (work / "graceful").read_text() == "hung-up\n"  # and the guest's processes were hung up
    assert wait_until_gone("pid1-term") == []
    assert leftovers(tmp_path / "rt") == []
