"""The console in a real terminal: tmux (its own server socket) with the supervisor in a pane, running
the real guest's shell; `send-keys` types, `capture-pane` reads.

Each pane runs a wrapper that records the pane's `stty -a` and the O_NONBLOCK flag of its tty
before the supervisor starts and right after it ends, so every exit path is checked for giving the
terminal back exactly as it was (after a SIGKILL of the supervisor, the watchdog does it).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor import guest
from tests.support import (
    REPO,
    base_env,
    children_of,
    instance_processes,
    is_watchdog,
    leftovers,
    supervisor_argv,
    wait_until_gone,
)

pytestmark = pytest.mark.vm

DEADLINE = 90.0  # generous: the VM boots in ~3 s alone, much slower on a loaded machine
PROMPT = re.compile(r"/work \$ $", re.MULTILINE)
CONFIG = """
[timeouts]
graceful-stop = 2   # the built-in guest ignores the ACPI power button: QMP quit after this
"""


class Tmux:
    def __init__(self, socket_name: str) -> None:
        self._base = ["tmux", "-L", socket_name, "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        result = subprocess.run([*self._base, *args], capture_output=True, text=True, check=False, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)[:200]} failed: {result.stderr.strip()}")
        return result.stdout

    def capture(self, target: str) -> str:
        return self("capture-pane", "-p", "-J", "-S", "-", "-t", target)

    def wait_for(self, target: str, pattern: str | re.Pattern[str], timeout: float = DEADLINE) -> str:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            screen = self.capture(target)
            if regex.search(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{regex.pattern!r} not on the screen within {timeout} s:\n{screen}")
            time.sleep(0.1)

    def type(self, target: str, text: str) -> None:
        self("send-keys", "-t", target, "-l", text)
        self("send-keys", "-t", target, "Enter")

    def keys(self, target: str, *keys: str) -> None:
        self("send-keys", "-t", target, *keys)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    # One server per test, on its own socket: reusing a name races the previous server's exit.
    name = f"agentvm-console-tests-{os.getpid()}-{secrets.token_hex(4)}"
    server = Tmux(name)
    server("new-session", "-d", "-s", "idle", "-x", "100", "-y", "30", "sleep 3600")
    # Not window-size manual: tmux 3.3a's server crashes on new-window with it (resize-window sets it
    # for the one window it resizes).
    for option in (("status", "off"), ("remain-on-exit", "on"), ("default-size", "100x30")):
        server("set", "-g", *option)
    yield server
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True, check=False)


@dataclass
class Pane:
    """A tmux window running a command through the recording wrapper."""

    target: str
    files: Path

    def before(self) -> str:
        return (self.files / "before").read_text()

    def after(self) -> str:
        return (self.files / "after").read_text()

    def status(self) -> int:
        return int((self.files / "status").read_text())

    def stderr(self) -> str:
        return (self.files / "stderr").read_text(errors="replace")

    def release(self) -> None:
        (self.files / "go").touch()


WRAPPER = r"""
trap '' HUP
files=$1; shift
stty -a >"$files/before"
python3 -c 'import fcntl, os; print(fcntl.fcntl(0, fcntl.F_GETFL) & os.O_NONBLOCK)' >>"$files/before"
"$@" 2>"$files/stderr"
echo $? >"$files/status"
if [ -n "$WAIT_FOR_GO" ]; then
    while [ ! -e "$files/go" ]; do sleep 0.05; done
fi
stty -a >"$files/after"
python3 -c 'import fcntl, os; print(fcntl.fcntl(0, fcntl.F_GETFL) & os.O_NONBLOCK)' >>"$files/after"
echo "EXIT=$(cat "$files/status")"
"""


@dataclass
class Session:
    tmux: Tmux
    tmp: Path
    name: str
    runtime: Path  # short: a unix socket path has at most 107 bytes

    def start(self, window: str, argv: list[str], *, wait_for_go: bool = False) -> Pane:
        files = self.tmp / window
        files.mkdir()
        wrapper = self.tmp / "wrapper.sh"
        wrapper.write_text(WRAPPER)
        env = base_env({"XDG_STATE_HOME": str(self.tmp / "state")})
        if wait_for_go:
            env["WAIT_FOR_GO"] = "1"
        variables = [shlex.quote(f"{key}={value}") for key, value in env.items()]
        words = ["sh", str(wrapper), str(files), *argv]
        command = " ".join(["env", "-i", *variables, "TERM=screen", *map(shlex.quote, words)])
        self.tmux("new-window", "-d", "-t", "idle:", "-n", window, "-c", str(REPO), command)
        return Pane(f"idle:{window}", files)

    def run_vm(self, window: str = "vm", *, wait_for_go: bool = False) -> Pane:
        work = self.tmp / "work"
        work.mkdir(exist_ok=True)
        config = self.tmp / "config.toml"
        config.write_text(CONFIG)
        argv = [
            *supervisor_argv(), "run", "--name", self.name, "--config", str(config), "--work-dir", str(work),
            "--agent-home", str(self.tmp / "home"), "--runtime-dir", str(self.runtime),
        ]  # fmt: skip
        pane = self.start(window, argv, wait_for_go=wait_for_go)
        try:
            self.tmux.wait_for(pane.target, PROMPT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe supervisor's stderr:\n{pane.stderr()[-3000:]}") from None
        return pane

    def attach(self, window: str) -> Pane:
        return self.start(window, [*supervisor_argv(), "attach", "--runtime-dir", str(self.runtime)])

    def supervisor_pid(self) -> int:
        [state] = self.runtime.glob("*/state.json")
        return int(json.loads(state.read_text())["supervisor_pid"])

    def pids(self, needle: str) -> list[int]:
        return [pid for pid, cmdline in instance_processes(self.name) if needle in cmdline]

    def assert_nothing_left(self) -> None:
        assert wait_until_gone(self.name) == []
        assert leftovers(self.runtime) == []


@pytest.fixture
def session(
    tmux: Tmux, tmp_path: Path, guest_assets: guest.GuestAssets, request: pytest.FixtureRequest
) -> Iterator[Session]:
    runtime = Path(tempfile.mkdtemp(prefix="avt-", dir="/tmp"))
    name = re.sub(r"[^a-z0-9]", "", request.node.name.removeprefix("test_"))[:24]
    yield Session(tmux, tmp_path, name, runtime)
    shutil.rmtree(runtime, ignore_errors=True)


def _exited(session: Session, pane: Pane) -> int:
    session.tmux.wait_for(pane.target, r"EXIT=\d+")
    return pane.status()


def _wait_for_guest_size(tmux: Tmux, pane: Pane, size: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        tmux.type(pane.target, "stty size")
        try:
            tmux.wait_for(pane.target, re.compile(rf"^{size}\s*$", re.MULTILINE), timeout=2.0)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_typing_ctrl_c_and_resizing_reach_the_guest_and_exit_gives_the_terminal_back(
    session: Session,
) -> None:
    tmux = session.tmux
    pane = session.run_vm()
    tmux.type(pane.target, "echo $((6*7))XYZ")
    tmux.wait_for(pane.target, re.compile(r"^42XYZ\s*$", re.MULTILINE))

    # Ctrl-C goes to the guest: it interrupts the sleep, the shell and the VM live on.
    tmux.type(pane.target, "sleep 600")
    time.sleep(1.0)
    tmux.keys(pane.target, "C-c")
    tmux.type(pane.target, "echo ALIVE-$((20+22))")
    tmux.wait_for(pane.target, re.compile(r"^ALIVE-42\s*$", re.MULTILINE))
    assert session.pids("qemu-system")
    # So do Ctrl-\ (SIGQUIT for the guest's sleep) and Ctrl-Z (the guest shell stops the job).
    tmux.type(pane.target, "sleep 600")
    time.sleep(1.0)
    tmux.keys(pane.target, "C-\\")
    tmux.wait_for(pane.target, re.compile(r"^\^\\Quit\s*$", re.MULTILINE))
    tmux.type(pane.target, "sleep 600")
    time.sleep(1.0)
    tmux.keys(pane.target, "C-z")
    tmux.wait_for(pane.target, re.compile(r"Stopped\s+sleep 600"))
    tmux.type(pane.target, "kill -9 %1")

    # Resizing the pane changes the guest terminal's size (asynchronously: ask until it shows).
    tmux("resize-window", "-t", pane.target, "-x", "123", "-y", "41")
    _wait_for_guest_size(tmux, pane, "41 123")
    tmux("resize-window", "-t", pane.target, "-x", "100", "-y", "30")
    _wait_for_guest_size(tmux, pane, "30 100")

    tmux.type(pane.target, "exit")
    assert _exited(session, pane) == 0, pane.stderr()
    assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_escape_d_detaches_and_attach_in_a_second_pane_replays_and_works(session: Session) -> None:
    tmux = session.tmux
    first = session.run_vm("first")
    tmux.type(first.target, "echo BEFORE-$((2+2))")
    tmux.wait_for(first.target, re.compile(r"^BEFORE-4\s*$", re.MULTILINE))
    tmux.keys(first.target, "C-]", "d")
    tmux.wait_for(first.target, r"detached; the VM keeps running")
    assert session.pids("qemu-system")

    second = session.attach("second")
    tmux.wait_for(second.target, re.compile(r"^BEFORE-4\s*$", re.MULTILINE))  # the replayed screen
    tmux.type(second.target, "echo AFTER-$((3+3))")
    tmux.wait_for(second.target, re.compile(r"^AFTER-6\s*$", re.MULTILINE))
    assert "AFTER-6" not in tmux.capture(first.target)  # the detached pane no longer shows the console

    # Ctrl-] d ends that attach; the VM runs on, and a later attach works the same way.
    tmux.keys(second.target, "C-]", "d")
    assert _exited(session, second) == 0, second.stderr()
    assert "the VM keeps running" in tmux.capture(second.target)
    third = session.attach("third")
    tmux.wait_for(third.target, re.compile(r"^AFTER-6\s*$", re.MULTILINE))
    tmux.type(third.target, "echo THIRD-$((4+4))")
    tmux.wait_for(third.target, re.compile(r"^THIRD-8\s*$", re.MULTILINE))

    # Ctrl-] . in the attached pane stops the VM; every pane gets its terminal back.
    tmux.keys(third.target, "C-]", ".")
    assert _exited(session, third) == 0, third.stderr()
    assert "the VM stopped" in tmux.capture(third.target)
    assert _exited(session, first) == 130, first.stderr()
    for pane in (first, second, third):
        assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_escape_dot_stops_the_vm(session: Session) -> None:
    pane = session.run_vm()
    session.tmux.keys(pane.target, "C-]", ".")
    session.tmux.wait_for(pane.target, r"stopping the VM")
    assert _exited(session, pane) == 130, pane.stderr()
    assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_kill_9_of_qemu_gives_the_terminal_back(session: Session) -> None:
    pane = session.run_vm()
    [qemu] = session.pids("qemu-system")
    os.kill(qemu, signal.SIGKILL)
    assert _exited(session, pane) == 128 + signal.SIGKILL, pane.stderr()
    assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_sigterm_of_the_supervisor_gives_the_terminal_back(session: Session) -> None:
    pane = session.run_vm()
    os.kill(session.supervisor_pid(), signal.SIGTERM)
    assert _exited(session, pane) == 128 + signal.SIGTERM, pane.stderr()
    assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_an_error_gives_the_terminal_back(session: Session) -> None:
    pane = session.run_vm()
    shares = session.pids("--shared-dir=")
    os.kill(min(shares), signal.SIGKILL)  # a virtiofsd dies: exit 75 with an error paragraph
    assert _exited(session, pane) == 75, pane.stderr()
    assert "while the VM was running" in pane.stderr()
    assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_kill_9_of_the_supervisor_gives_the_terminal_back_through_the_watchdog(session: Session) -> None:
    pane = session.run_vm(wait_for_go=True)
    supervisor = session.supervisor_pid()
    [watchdog] = [pid for pid in children_of(supervisor) if is_watchdog(pid)]
    os.kill(supervisor, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    while Path(f"/proc/{watchdog}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pane.release()
    assert _exited(session, pane) == 128 + signal.SIGKILL
    assert pane.after() == pane.before()
    session.assert_nothing_left()


def test_closing_the_pane_stops_the_vm_with_sighup_without_a_crash(session: Session) -> None:
    """SIGHUP status and nothing left; the stop may take the graceful path or, when QMP is already
    gone, the kill path (both are accepted: the name used to promise the graceful one)."""
    pane = session.run_vm()
    session.tmux.type(pane.target, "echo $((1+1)); yes hangup-test | head -c 3000000")  # output in flight
    time.sleep(0.5)
    session.tmux("kill-pane", "-t", pane.target)
    deadline = time.monotonic() + DEADLINE
    while not (pane.files / "status").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pane.status() == 128 + signal.SIGHUP, pane.stderr()
    stderr = pane.stderr()
    assert "asked the guest to power off" in stderr or "QMP unavailable" in stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    session.assert_nothing_left()
