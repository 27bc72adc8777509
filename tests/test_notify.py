"""sd_notify against real AF_UNIX datagram sockets, alone and with the real guest."""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from supervisor import config, guest, notify
from tests.container_support import Launched
from tests.support import base_env, instance_processes, leftovers, supervisor_argv, wait_until_gone


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, Path]]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        yield sock, path


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_notifier_sends_datagrams_to_a_path(listener: tuple[socket.socket, Path]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": str(path), "OTHER": "x"}
    notifier = notify.Notifier.from_env(env)
    assert env == {"OTHER": "x"}  # taken out, so that children cannot speak for us
    notifier.status("starting\nsoon")
    notifier.ready("running")
    notifier.ready("running again")  # READY=1 only once
    notifier.stopping("stopping")
    notifier.close()
    assert _fields(sock.recv(4096)) == {"STATUS": "starting soon"}
    assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "running"}
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "stopping"}


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"agentvm-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        notifier = notify.Notifier(f"@{name}")
        notifier.ready("up")
        notifier.close()
        assert _fields(sock.recv(4096)) == {"READY": "1", "STATUS": "up"}


def test_notifier_failures_are_logged_once_and_never_raise(tmp_path: Path) -> None:
    with capture_logs() as logs:
        notifier = notify.Notifier(str(tmp_path / "nobody-listens.sock"))
        notifier.status("a")
        notifier.ready("b")
        notifier.close()
        relative = notify.Notifier("relative.sock")
        relative.ready("c")
    assert not relative.enabled
    events = [entry["event"] for entry in logs]
    assert events.count("cannot notify the service manager") == 1
    assert any("neither an absolute path" in event for event in events)


def test_extending_sends_extend_timeout_until_the_block_ends(listener: tuple[socket.socket, Path]) -> None:
    sock, path = listener
    notifier = notify.Notifier(str(path))
    threads = threading.active_count()
    with notify.extending(notifier, "building the guest", every=0.05):
        first = _fields(sock.recv(4096))
        again = [_fields(sock.recv(4096)) for _ in range(2)]
    assert threading.active_count() == threads  # joined: the watchdog's fork comes later
    notifier.close()
    assert first == {"STATUS": "building the guest", "EXTEND_TIMEOUT_USEC": "100000"}
    assert again == [{"EXTEND_TIMEOUT_USEC": "100000"}] * 2
    # without a service manager: no thread, nothing sent
    with notify.extending(notify.Notifier(None), "x", every=0.01):
        assert threading.active_count() == threads


def test_stopping_gives_the_whole_stop_path(listener: tuple[socket.socket, Path]) -> None:
    sock, path = listener
    notifier = notify.Notifier(str(path))
    notifier.stopping("stopping x", budget=notify.stop_budget(config.Timeouts(), deadline=600))
    notifier.close()
    # a `stop --deadline 600` outlasts the unit's TimeoutStopSec=30 unless the stop is extended
    assert _fields(sock.recv(4096)) == {
        "STOPPING": "1", "STATUS": "stopping x", "EXTEND_TIMEOUT_USEC": str((600 + 3 + 2 * 2 + 5) * 1_000_000),
    }  # fmt: skip


def test_waiting_for_kvm_extends_the_start_and_logs_at_journal_priority(
    tmp_path: Path, listener: tuple[socket.socket, Path]
) -> None:
    """Issue 11: a Type=notify start waiting for KVM hit systemd's 90 s start timeout, and every
    JSON line reached the journal at priority info."""
    sock, path = listener
    stderr_path = tmp_path / "stderr"
    with stderr_path.open("wb") as stderr:
        found = stderr_path.stat()
        result = subprocess.run(
            [*supervisor_argv(), "run", "--work-dir", str(tmp_path), "--accel", "kvm",
             "--kvm-device", str(tmp_path / "no-kvm"), "--wait-kvm=0.5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, timeout=60, check=False,
            env=base_env({"NOTIFY_SOCKET": str(path), "JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"}),
        )  # fmt: skip
    assert result.returncode == 69
    assert _fields(sock.recv(4096)) == {
        "STATUS": "waiting for the KVM device", "EXTEND_TIMEOUT_USEC": str(int(2 * notify.EXTEND_EVERY * 1e6)),
    }  # fmt: skip
    lines = stderr_path.read_text().splitlines()
    [waiting] = [line for line in lines if '"waiting for the KVM device"' in line]
    assert waiting.startswith('<4>{"device": ')
    assert "no-kvm" in lines[-1] and not lines[-1].startswith("<")  # the error paragraph is no log line


@pytest.mark.vm
def test_ready_arrives_only_after_the_runner_started_then_stopping(
    guest_assets: guest.GuestAssets, tmp_path: Path, listener: tuple[socket.socket, Path]
) -> None:
    sock, path = listener
    work = tmp_path / "work"
    work.mkdir()
    runtime = tmp_path / "rt"
    sup = Launched(
        [*supervisor_argv(), "run", "--name", "notify", "--work-dir", str(work),
         "--agent-home", str(tmp_path / "home"), "--runtime-dir", str(runtime),
         "--", "sh", "-c", "echo GUEST-READY; sleep 600"],
        tmp_path,
        env={"NOTIFY_SOCKET": str(path)},
    )  # fmt: skip
    try:
        before_ready: list[dict[str, str]] = []
        while True:
            fields = _fields(sock.recv(4096))
            if fields.get("READY") == "1":
                break
            before_ready.append(fields)
        # At READY=1, QEMU runs and has answered on QMP.
        [(qemu, _)] = [entry for entry in instance_processes("notify") if "qemu-system" in entry[1]]
        statuses = [fields_["STATUS"] for fields_ in before_ready if "STATUS" in fields_]
        assert statuses[0].startswith("checking the host") and statuses[1].startswith("starting notify-")
        assert fields["STATUS"].startswith("running notify-")
        assert b"NOTIFY_SOCKET" not in Path(f"/proc/{qemu}/environ").read_bytes()
        order = [
            (event.get("child"), event["event"])
            for event in sup.events()
            if event["event"] in ("started", "ready", "vm started")
        ]
        assert order.index(("runner", "started")) < order.index((None, "ready"))

        sup.read_until(b"GUEST-READY")
        sup.proc.send_signal(signal.SIGTERM)
        fields = _fields(sock.recv(4096))
        budget = str(int(notify.stop_budget(config.Timeouts()) * 1_000_000))
        assert fields == {"STOPPING": "1", "STATUS": fields["STATUS"], "EXTEND_TIMEOUT_USEC": budget}
        assert "signal SIGTERM" in fields["STATUS"]
        assert sup.wait() == 128 + signal.SIGTERM, sup.stderr()
    finally:
        sup.kill()
    assert wait_until_gone("notify") == []
    assert leftovers(runtime) == []
