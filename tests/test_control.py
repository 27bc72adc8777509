"""The control socket and the status/stop/list verbs, against a real supervisor whose runner is
tests/fake_qemu.py (a real process speaking QMP; no guest boot), with a real virtiofsd."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from supervisor import control, guest, outputs, runtime
from tests.container_support import Launched, fake_runner_config
from tests.support import base_env, children_of, is_watchdog, leftovers, supervisor_argv, wait_until_gone


@dataclass
class Live:
    sup: Launched
    socket: Path
    runtime: Path


def _start(tmp_path: Path, name: str) -> tuple[Launched, runtime.Found]:
    config = fake_runner_config(tmp_path, name)
    sup = Launched([*supervisor_argv(), "run", "--config", str(config)], tmp_path)
    sup.read_until(b"RUNNER-UP")
    live, _ = runtime.scan(tmp_path / "rt")
    [found] = [found for found in live if found.state.instance.startswith(f"{name}-")]
    return sup, found


@pytest.fixture(scope="module")
def live(guest_assets: guest.GuestAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One instance for the whole module; the last test stops it."""
    tmp = tmp_path_factory.mktemp("control")
    sup, found = _start(tmp, "ctl")
    yield Live(sup, found.control_socket, tmp / "rt")
    sup.kill()


def _raw(path: Path, data: bytes, *, timeout: float = 20.0) -> dict[str, object]:
    """Send raw bytes (however many, whatever they are) and return the reply line as JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        # The server may stop reading at its limit; its reply is queued for us all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        reply = b""
        while b"\n" not in reply:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            reply += chunk
    assert reply.endswith(b"\n"), reply
    decoded: dict[str, object] = json.loads(reply)
    return decoded


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*supervisor_argv(), *args], capture_output=True, text=True, env=base_env(), timeout=120, check=False
    )


def test_status_describes_the_instance(live: Live) -> None:
    status = control.call(live.socket, control.StatusRequest())
    assert status.phase == "running"
    assert status.instance.startswith("ctl-") and status.supervisor_pid == live.sup.proc.pid
    assert [child.name for child in status.children] == ["virtiofsd[work]", "runner"]
    for child in status.children:
        assert child.state == "running" and child.exit_status is None
        assert Path(f"/proc/{child.pid}").exists()
        assert abs(child.started - time.time()) < 600
    [share] = status.shares
    assert (share.tag, share.guest_path, share.read_only) == ("work", "/mnt/work", False)
    assert status.accelerator == "tcg" and status.console_attached is False
    assert status.stop_cause is None
    assert stat.S_IMODE(live.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(live.socket.parent.stat().st_mode) == 0o700


def test_concurrent_clients_all_get_answers(live: Live) -> None:
    def ask(_: int) -> str:
        return control.call(live.socket, control.StatusRequest(), timeout=30).instance

    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(ask, range(120)))
    assert len(answers) == 120 and len(set(answers)) == 1


def test_a_silent_client_blocks_nobody_and_is_dropped_after_its_deadline(live: Live) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(live.socket))
        connected = time.monotonic()
        # Others are served while it sits there.
        for _ in range(5):
            assert control.call(live.socket, control.StatusRequest()).phase == "running"
        with pytest.raises(BlockingIOError):
            silent.recv(1, socket.MSG_DONTWAIT)  # nothing for it yet: still connected, still waiting
        assert time.monotonic() - connected < control.REQUEST_TIMEOUT
        silent.settimeout(control.REQUEST_TIMEOUT + 20)
        reply = json.loads(silent.makefile("rb").readline())
    assert reply["ok"] is False and "no complete request within" in reply["error"]


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\x00\xff\xfegarbage{{{\n", "not valid JSON"),
        (b"[1, 2, 3]\n", "invalid request"),
        (b'{"v": 1}\n', "invalid request"),
        (b'{"v": 1, "op": "reboot"}\n', "unknown op 'reboot': the ops are status, stop"),
        (b'{"v": 2, "op": "status"}\n', "protocol version 2 is not supported"),
        (b'{"v": 1, "op": "status", "extra": true}\n', "invalid 'status' request"),
        (b'{"v": 1, "op": "stop", "deadline": -1}\n', "invalid 'stop' request"),
        (b'{"v": 1, "op": "stop", "deadline": "soon"}\n', "$.deadline"),
    ],
)
def test_bad_requests_get_an_error_reply(live: Live, data: bytes, says: str) -> None:
    reply = _raw(live.socket, data)
    assert reply["ok"] is False and says in str(reply["error"]), reply
    assert control.call(live.socket, control.StatusRequest()).phase == "running"  # stop was not taken


def test_random_bytes_and_a_10_mb_request_get_an_error_reply(live: Live) -> None:
    reply = _raw(live.socket, os.urandom(50_000).replace(b"\n", b" ") + b"\n")
    assert reply["ok"] is False
    huge = b'{"v": 1, "op": "status", "pad": "' + b"x" * (10 * 1024 * 1024)
    reply = _raw(live.socket, huge)
    assert reply["ok"] is False and f"over {control.MAX_REQUEST} bytes" in str(reply["error"])
    assert control.call(live.socket, control.StatusRequest()).phase == "running"


def test_stop_with_a_deadline_is_not_stalled_by_a_silent_client(live: Live) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(live.socket))
        status = control.call(live.socket, control.StopRequest(deadline=3))
        assert status.phase == "stopping" and status.stop_cause == "stop requested on the control socket"
        assert live.sup.wait() == 128 + signal.SIGTERM, live.sup.stderr()
        # Teardown closed the silent connection instead of waiting out its deadline.
        silent.settimeout(control.REQUEST_TIMEOUT + 20)
        assert silent.recv(65536) == b""
    events = live.sup.events()
    assert any(
        event["event"] == "asked the guest to power off" and event["deadline_s"] == 3 for event in events
    )
    # Issue 11: the instance id is bound once, so every line has it (children's lines too).
    assert [event for event in events if not str(event.get("instance")).startswith("ctl-")] == []
    assert wait_until_gone("ctl") == []
    assert leftovers(live.runtime) == []


def _watchdog_of(supervisor: int) -> int:
    [watchdog] = [pid for pid in children_of(supervisor) if is_watchdog(pid)]
    return watchdog


def test_list_shows_the_live_instance_and_cleans_up_the_stale_one(
    guest_assets: guest.GuestAssets, tmp_path: Path
) -> None:
    alive, alive_found = _start(tmp_path, "alive")
    doomed, doomed_found = _start(tmp_path, "doomed")
    try:
        # Kill the watchdog first, or it would clean up after the supervisor at once.
        os.kill(_watchdog_of(doomed.proc.pid), signal.SIGKILL)
        doomed.proc.kill()
        doomed.wait()
        assert doomed_found.path.exists()  # nobody cleaned up: stale

        refused = _cli("status", doomed_found.state.instance, "--runtime-dir", str(tmp_path / "rt"))
        assert refused.returncode == 66 and "supervisor is gone" in refused.stderr

        listed = _cli("list", "--json", "--runtime-dir", str(tmp_path / "rt"))
        assert listed.returncode == 0, listed.stderr
        # the published schema's type, decoded strictly (issue 11: it was built from dicts)
        report = msgspec.json.decode(listed.stdout, type=outputs.InstanceList)
        assert [entry.instance for entry in report.instances] == [alive_found.state.instance]
        assert report.instances[0].phase == "running"
        assert report.stale_cleaned == [doomed_found.state.instance]
        assert f"cleaned up {doomed_found.state.instance}" in listed.stderr
        assert not doomed_found.path.exists()
        assert wait_until_gone("doomed") == []

        human = _cli("list", "--runtime-dir", str(tmp_path / "rt"))
        assert human.returncode == 0 and alive_found.state.instance in human.stdout
        assert "doomed" not in human.stdout + human.stderr  # cleaned once, gone for good

        # Only one instance is left, so the verbs find it without a name.
        shown = _cli("status", "--runtime-dir", str(tmp_path / "rt"))
        assert shown.returncode == 0, shown.stderr
        assert alive_found.state.instance in shown.stdout and "virtiofsd[work]" in shown.stdout
        stopped = _cli("stop", "--deadline", "2", "--json", "--runtime-dir", str(tmp_path / "rt"))
        assert stopped.returncode == 0, stopped.stderr
        assert alive.proc.poll() == 128 + signal.SIGTERM  # `stop` returned after the supervisor ended
        result = msgspec.json.decode(stopped.stdout, type=outputs.StopResult)
        assert (result.instance, result.stopped) == (alive_found.state.instance, True)
        assert (
            result.status.phase == "stopping"
            and result.status.stop_cause == "stop requested on the control socket"
        )
    finally:
        alive.kill()
        doomed.kill()
    assert wait_until_gone("alive") == []
    assert leftovers(tmp_path / "rt") == []


def test_verbs_name_what_is_wrong(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    none = _cli("status", "--runtime-dir", str(runtime))
    assert (
        none.returncode == 66 and f"no running agentvm instance of this user under {runtime}" in none.stderr
    )
    missing = _cli("stop", "nope", "--runtime-dir", str(runtime))
    assert missing.returncode == 66 and "no running instance is called 'nope'" in missing.stderr
    empty = _cli("list", "--runtime-dir", str(runtime))
    assert empty.returncode == 0 and "no instances are running" in empty.stderr
