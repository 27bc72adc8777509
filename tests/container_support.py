"""Helpers for the container-host tests: a fast stand-in runner, a launcher with stderr in a file
(so a chatty supervisor never blocks on a full pipe), and /proc probes."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.support import REPO, base_env, children_of

FAKE_QEMU = REPO / "tests" / "fake_qemu.py"


def fake_runner_config(tmp_path: Path, name: str) -> Path:
    """A config whose runner is tests/fake_qemu.py (custom kernel: exit status = the runner's)."""
    runner = tmp_path / "fake-qemu"
    runner.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_QEMU} "$@"\n')
    runner.chmod(0o755)
    kernel = tmp_path / "not-a-kernel"
    kernel.write_bytes(b"\0")
    (tmp_path / "work").mkdir(exist_ok=True)
    config = tmp_path / f"{name}.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            name = "{name}"
            runtime-dir = "{tmp_path / "rt"}"
            [[shares]]
            tag = "work"
            source = "{tmp_path / "work"}"
            [qemu]
            binary = "{runner}"
            kernel = "{kernel}"
            accel = "tcg"
            """
        )
    )
    return config


def in_new_pid_namespace(argv: list[str]) -> list[str]:
    return ["unshare", "--pid", "--fork", "--mount-proc", *argv]


class Launched:
    """A supervisor (or unshare around one) with stdout piped and stderr in a file."""

    def __init__(self, argv: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}"
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=base_env(env)
            )
        self.output = b""
        self.init: int | None = None

    def read_until(self, marker: bytes, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(
                    f"{marker!r} not seen in {timeout} s; stdout {self.output!r}; {self.stderr()}"
                )
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF before {marker!r}; stdout {self.output!r}; {self.stderr()}")
            self.output += chunk

    def wait(self, timeout: float = 90.0) -> int:
        assert self.proc.stdout is not None
        rest, _ = self.proc.communicate(timeout=timeout)
        self.output += rest
        return self.proc.returncode

    def kill(self) -> None:
        """For a failed test: SIGKILL of a namespace's init takes the whole namespace along."""
        if self.proc.poll() is None:
            for pid in (self.init, self.proc.pid):
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def namespace_init(self, timeout: float = 10.0) -> int:
        """Host pid of the process unshare forked: PID 1 of the new namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = list(children_of(self.proc.pid))
            if kids:
                self.init = kids[0]
                return kids[0]
            time.sleep(0.01)
        raise AssertionError("unshare forked no child")


def proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3].decode()


def zombie_children(pid: int) -> list[int]:
    return [child for child in children_of(pid) if proc_state(child) == "Z"]


def find_by_cmdline(needle: bytes, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if needle in (entry / "cmdline").read_bytes():
                        return int(entry.name)
                except OSError:
                    continue
        time.sleep(0.02)
    raise AssertionError(f"no process with {needle!r} in its command line")


def ns_pid(pid: int) -> int:
    """The pid of host process `pid` in its own (innermost) PID namespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")
