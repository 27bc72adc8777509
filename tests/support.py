"""Helpers for tests that run the real supervisor, real QEMU and real virtiofsd."""

from __future__ import annotations

import os
import pwd
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(os.environ.get("AGENTVM_TEST_CACHE", "/var/tmp/agentvm-supervise-test-cache"))
TEST_USER = "agentvm-test"
# Console logs of test runs go here (one dir per user), not into the home of whoever runs the tests.
TEST_STATE = Path("/var/tmp/agentvm-supervise-test-state")
INSTANCE_ENV = "AGENTVM_INSTANCE"


def supervisor_argv() -> list[str]:
    return [sys.executable, "-m", "supervisor"]


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE),
        "PYTHONPATH": str(REPO),
        "LANG": "C.UTF-8",
        "XDG_STATE_HOME": f"{TEST_STATE}-{os.geteuid()}",
        # No default config file (~/.config/agentvm-supervise/config.toml) a person may have left.
        "XDG_CONFIG_HOME": "/nonexistent/agentvm-supervise-tests",
    }
    if extra:
        env.update(extra)
    return env


def as_user(user: str | None, argv: Sequence[str]) -> list[str]:
    if user is None:
        return list(argv)
    state = f"XDG_STATE_HOME={TEST_STATE}-{pwd.getpwnam(user).pw_uid}"
    return ["runuser", "-u", user, "--", "env", state, *argv]


def processes_with_env(needle: bytes, *, exact: bool = False) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live (non-zombie) process with a variable starting with `needle`
    (equal to it with `exact`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] == b"Z":
            continue
        if any(var == needle if exact else var.startswith(needle) for var in environ.split(b"\0")):
            found.append((int(entry.name), cmdline))
    return found


def instance_processes(name: str) -> list[tuple[int, str]]:
    """(pid, cmdline) of every live process whose environment names an instance called `name`-*."""
    return processes_with_env(f"{INSTANCE_ENV}={name}-".encode())


def shared_dir(pid: int) -> str | None:
    """The directory a virtiofsd exports: it gets it as an open fd (--shared-dir=/proc/self/fd/N)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        match = re.search(r"--shared-dir=/proc/self/fd/(\d+)", cmdline)
        return None if match is None else str(Path(f"/proc/{pid}/fd/{match.group(1)}").readlink())
    except OSError:
        return None


def wait_until_gone(name: str, timeout: float = 10.0) -> list[tuple[int, str]]:
    """Processes of instance `name` still alive after `timeout` (teardown may lag the exit by ms)."""
    deadline = time.monotonic() + timeout
    while True:
        left = instance_processes(name)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def leftovers(runtime_base: Path, timeout: float = 0.0) -> list[str]:
    """Files left under `runtime_base`, waiting up to `timeout` (the watchdog cleans up after a
    SIGKILLed supervisor asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = sorted(str(path) for path in runtime_base.rglob("*")) if runtime_base.exists() else []
        except FileNotFoundError:  # a dir removed while we walked it: the cleanup is under way
            found = ["(changing)"]
        if not found or time.monotonic() >= deadline:
            return found
        time.sleep(0.02)


@dataclass
class Supervisor:
    """A supervisor started in the background, with its stdout read line by line."""

    proc: subprocess.Popen[bytes]
    output: bytearray

    def read_until(self, marker: bytes, timeout: float = 60.0) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{marker!r} not seen within {timeout} s; output: {bytes(self.output)!r}"
                )
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(
                        f"EOF before {marker!r}; output: {bytes(self.output)!r}; {self._ended()}"
                    )
                self.output += chunk
        return bytes(self.output)

    def _ended(self) -> str:
        """How the supervisor ended, with its stderr: what a failed read_until needs to say."""
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            return "it closed its stdout but is still running"
        return f"exit status {self.proc.returncode}, stderr: {err.decode(errors='replace')[-2000:]!r}"

    def finish(self, timeout: float = 60.0) -> tuple[int, bytes, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, bytes(self.output) + out, err.decode(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)


def start_supervisor(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
) -> Supervisor:
    proc = subprocess.Popen(
        as_user(user, [*supervisor_argv(), *args]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=base_env(env),
        cwd=cwd,
    )
    supervisor = Supervisor(proc, bytearray())
    STARTED.append(supervisor)
    return supervisor


# Supervisors started by the running test: conftest stops any left running when a test fails
# midway, so a failed test leaves no VM behind (nor one that a later test would find by name).
STARTED: list[Supervisor] = []


def stop_leftover_supervisors() -> None:
    while STARTED:
        proc = STARTED.pop().proc
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)  # the graceful path: the VM and its daemons go too
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def run_supervisor(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_user(user, [*supervisor_argv(), *args]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=base_env(env),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def children_of(pid: int) -> Iterator[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return
    for child in text.split():
        yield int(child)


def is_watchdog(pid: int) -> bool:
    """The supervisor's watchdog runs supervisor/watchdog_main.py (a bare interpreter)."""
    try:
        return b"/watchdog_main.py\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def user_ids(user: str) -> tuple[int, int]:
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


Launch = Callable[..., Supervisor]  # the `launch` fixture: start_supervisor, cleaned up after the test


class SubIds:
    """Subordinate id ranges (/etc/subuid, /etc/subgid) given to users for one test, taken back after.

    Through usermod, which locks the files: other test runs on the machine may edit them too."""

    def __init__(self) -> None:
        self._given: list[tuple[str, str]] = []

    @staticmethod
    def covers(user: str, base: int, count: int) -> bool:
        """Whether both files give `user` one range covering base..base+count-1."""
        uid = str(pwd.getpwnam(user).pw_uid)
        for table in (Path("/etc/subuid"), Path("/etc/subgid")):
            text = table.read_text() if table.exists() else ""
            ranges = [line.split(":") for line in text.splitlines() if line.count(":") == 2]
            if not any(
                who in (user, uid) and int(start) <= base and base + count <= int(start) + int(length)
                for who, start, length in ranges
            ):
                return False
        return True

    def give(self, user: str, base: int, count: int) -> None:
        if self.covers(user, base, count):
            return  # already there (given by someone else): not ours to take back
        spec = f"{base}-{base + count - 1}"
        subprocess.run(["usermod", "--add-subuids", spec, "--add-subgids", spec, user], check=True)
        self._given.append((user, spec))

    def take_back(self) -> None:
        for user, spec in self._given:
            subprocess.run(
                ["usermod", "--del-subuids", spec, "--del-subgids", spec, user],
                capture_output=True,
                check=False,
            )
        self._given.clear()
