"""Fault injection against the real supervisor, with stub children (tests/stubs/) for volume.

A case is drawn from a seeded random generator: a fault (kill -9 or SIGSTOP+SIGCONT of the
supervisor, its watchdog, the runner, a virtiofsd or virtiofsd's sandbox child; a signal to the
supervisor; a virtiofsd that exits before QEMU connects; QEMU refusing a bad argument; an unwritable
runtime dir; a share dir removed mid-run), a moment of the lifecycle (start, running, teardown), how
the run ends otherwise (the guest command finishes, SIGTERM, the console's escape key), and the
setup (socket mode, built-in guest or custom kernel, a TTY or not, root or an unprivileged user,
stubs that ignore SIGTERM or the power-off request, a guest flooding its status port). `run_case` plays it and `check` returns what
went wrong: a process or file of the instance left behind, the terminal's settings changed, an exit
status outside the ones the case allows, or no clear message naming the cause.

Case N of seed S is always the same case (`Random(f"{S}-{N}")`), whatever else runs; timing is real,
so a failure that depends on a race may need a few runs to show again.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import shutil
import signal
import subprocess
import termios
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import REPO, TEST_CACHE, is_watchdog, processes_with_env, supervisor_argv

STUBS = Path(__file__).resolve().parent / "stubs"
FAKE_QEMU = STUBS / "fake_qemu.py"
FAKE_VIRTIOFSD = STUBS / "fake_virtiofsd.py"
TAGS = ("work", "home", "data")
GUEST_STATUS = 3  # what the stub guest's command exits with
MARKER = b"GUEST-READY"
CASE_ENV = "AGENTVM_FAULT_CASE_ID"  # in the supervisor's environment, so in every process it starts
EXIT_DEADLINE_S = 40.0  # generous: 2 busy cores, many cases in parallel

SEED_ENV = "AGENTVM_FAULT_SEED"
CASES_ENV = "AGENTVM_FAULT_CASES"
JOBS_ENV = "AGENTVM_FAULT_JOBS"
ONLY_ENV = "AGENTVM_FAULT_ONLY"  # comma-separated case indexes: replay just those
DEFAULT_CASES = 200
DEFAULT_JOBS = 4

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGHUP: "SIGHUP"}


@dataclass(frozen=True)
class FaultSettings:
    seed: int
    count: int
    jobs: int
    only: tuple[int, ...]  # empty: cases 0..count-1

    @property
    def indexes(self) -> list[int]:
        return list(self.only) if self.only else list(range(self.count))


def fault_settings(
    *, seed: int | None, cases: int | None, jobs: int | None, env: Mapping[str, str]
) -> FaultSettings:
    """Options win over the environment; without either, a fresh seed each run (printed)."""
    if seed is None:
        seed = int(env[SEED_ENV]) if env.get(SEED_ENV) else random.SystemRandom().randrange(1, 1_000_000)
    if cases is None:
        cases = int(env.get(CASES_ENV) or DEFAULT_CASES)
    if jobs is None:
        jobs = int(env.get(JOBS_ENV) or DEFAULT_JOBS)
    only = tuple(int(part) for part in env.get(ONLY_ENV, "").split(",") if part.strip())
    return FaultSettings(seed=seed, count=cases, jobs=max(1, jobs), only=only)


FAULT_SETTINGS = pytest.StashKey[FaultSettings]()


@dataclass(frozen=True)
class Case:
    seed: int
    index: int
    # kill9 stopcont signal exits-early bad-arg base-unwritable dir-readonly share-removed none
    fault: str
    target: str  # supervisor | watchdog | runner | virtiofsd:TAG | sandbox:TAG | "" (no process target)
    phase: str  # start | running | teardown
    delay: float  # seconds after the phase's moment
    pause: float  # SIGSTOP -> SIGCONT
    end: str  # runner-exits | sigterm | escape
    signum: int  # for fault == "signal"
    socket_mode: str  # fd | path
    builtin: bool  # the built-in guest's command line (status file) or a custom kernel
    tty: bool
    user: bool
    qemu_behaviour: str  # STUB_QEMU
    virtiofsd_behaviour: str  # STUB_VIRTIOFSD

    @property
    def case_id(self) -> str:
        return f"{self.seed}-{self.index}"

    def describe(self) -> str:
        parts = [f"case {self.index} of seed {self.seed}: {self.fault}"]
        if self.target:
            parts.append(f"of {self.target}")
        if self.fault == "signal":
            parts.append(SIGNAL_NAMES[signal.Signals(self.signum)])
        parts.append(f"during {self.phase} (+{self.delay * 1000:.0f} ms")
        parts[-1] += f", paused {self.pause * 1000:.0f} ms)" if self.fault == "stopcont" else ")"
        parts.append(f"end={self.end} socket-mode={self.socket_mode}")
        parts.append("built-in guest" if self.builtin else "custom kernel")
        parts.append("tty" if self.tty else "no tty")
        parts.append("as user" if self.user else "as root")
        if self.qemu_behaviour:
            parts.append(f"STUB_QEMU={self.qemu_behaviour}")
        if self.virtiofsd_behaviour:
            parts.append(f"STUB_VIRTIOFSD={self.virtiofsd_behaviour}")
        return " ".join(parts)


def make_case(seed: int, index: int) -> Case:
    rng = random.Random(f"{seed}-{index}")
    fault = rng.choices(
        ["kill9", "stopcont", "signal", "exits-early", "bad-arg", "base-unwritable", "dir-readonly",
         "share-removed", "none"],
        weights=[36, 18, 10, 7, 5, 4, 7, 6, 7],
    )[0]  # fmt: skip
    tag = rng.choice(TAGS)
    target = ""
    if fault in ("kill9", "stopcont"):
        kind = rng.choices(
            ["supervisor", "watchdog", "runner", "virtiofsd", "sandbox"], weights=[20, 10, 25, 30, 15]
        )[0]
        target = f"{kind}:{tag}" if kind in ("virtiofsd", "sandbox") else kind
    elif fault == "signal":
        target = "supervisor"
    elif fault in ("exits-early", "share-removed"):
        target = f"virtiofsd:{tag}"
    phase = rng.choice(["start", "running", "teardown"])
    if fault in ("exits-early", "bad-arg", "base-unwritable"):
        phase = "start"
    elif fault == "share-removed":
        phase = "running"
    tty = rng.random() < 0.3
    ends = ["runner-exits", "sigterm"] + (["escape"] if tty else [])
    socket_mode = "path" if rng.random() < 0.3 else "fd"
    qemu_behaviour = rng.choices(
        [
            "",
            "ignore-powerdown",
            "slow-powerdown",
            "ignore-term",
            "ignore-powerdown,ignore-term",
            "flood-status",
        ],
        weights=[65, 10, 10, 5, 5, 5],
    )[0]  # flood-status: a hostile guest writing past the status port's cap (issue 11, D4)
    virtiofsd_behaviour = ""
    if fault == "exits-early":
        virtiofsd_behaviour = f"{tag}=exit-early"
    elif rng.random() < 0.2:
        other = rng.choice(TAGS)
        virtiofsd_behaviour = f"{other}=" + (
            "slow-socket" if socket_mode == "path" and rng.random() < 0.5 else "ignore-term"
        )
    return Case(
        seed=seed,
        index=index,
        fault=fault,
        target=target,
        phase=phase,
        delay=rng.uniform(0.0, 0.5 if target == "supervisor" and phase == "start" else 0.3),
        pause=rng.uniform(0.02, 0.3),
        end=rng.choice(ends),
        signum=rng.choice([signal.SIGTERM, signal.SIGINT, signal.SIGHUP]),
        socket_mode=socket_mode,
        builtin=rng.random() < 0.5,
        tty=tty,
        user=fault in ("base-unwritable", "dir-readonly") or rng.random() < 0.25,
        qemu_behaviour=qemu_behaviour,
        virtiofsd_behaviour=virtiofsd_behaviour,
    )


def fixed_case(**fields: object) -> Case:
    """A hand-made case (regression tests): no fault, runner exits, fd mode, custom kernel, root."""
    values: dict[str, object] = {
        "seed": 0, "index": 0, "fault": "none", "target": "", "phase": "running", "delay": 0.0,
        "pause": 0.0, "end": "runner-exits", "signum": signal.SIGTERM, "socket_mode": "fd",
        "builtin": False, "tty": False, "user": False, "qemu_behaviour": "", "virtiofsd_behaviour": "",
    }  # fmt: skip
    values.update(fields)
    return Case(**values)  # type: ignore[arg-type]


# ---- what each case may end with ------------------------------------------------------------


@dataclass(frozen=True)
class Allowed:
    code: int  # Popen returncode: -N when the supervisor itself was killed by signal N
    message: str  # a regex stderr must match ("" = nothing required)
    why: str


def _signal_message(signum: int) -> str:
    name = SIGNAL_NAMES[signal.Signals(signum)]
    # Logged once the VM's processes run; said in one line when it came earlier, during the start.
    return rf"stopping on signal .*signal={name}|stopped by {name} while starting"


def _normal(case: Case) -> list[Allowed]:
    """How the case ends when the fault changes nothing."""
    if case.end == "runner-exits":
        if case.builtin and "flood-status" in case.qemu_behaviour:
            return [Allowed(77, r"more than 64 KiB to its status port", "a hostile status port")]
        message = "" if case.builtin else r"runner failed .*status 3"
        return [Allowed(GUEST_STATUS, message, "the guest command's status")]
    if case.end == "sigterm":
        return [Allowed(128 + signal.SIGTERM, _signal_message(signal.SIGTERM), "stopped by SIGTERM")]
    return [Allowed(130, "", "stopped from the console")]  # like a stop signal, whatever the runner


def _runner_killed(case: Case) -> Allowed:
    if case.builtin:
        return Allowed(137, r"QEMU \(pid \d+\) was killed by SIGKILL before the guest", "runner killed")
    return Allowed(137, r"runner failed .*killed by SIGKILL", "runner killed")


def _share_died(tag: str) -> Allowed:
    return Allowed(75, rf"virtiofsd for share '{tag}'", f"virtiofsd[{tag}] died")


def allowed_outcomes(case: Case, *, injected: bool = True) -> list[Allowed]:
    """The exit statuses (each with the message it needs) that are right for `case`.

    A signal the harness sends may land after the supervisor has finished its work and left its
    signal handlers (the end trigger racing a fault's own end, or a second signal): then the
    default action ends the process, which is right as long as it had already said why it stops.
    """
    allowed = _allowed(case, injected=injected)
    sent = {case.signum} if case.fault == "signal" and injected else set()
    if case.end == "sigterm":
        sent.add(signal.SIGTERM)
    late = r"\[(warning|error) *\]|^agentvm-supervise: "  # it had said why it stops
    allowed += [Allowed(-signum, late, "a signal after the supervisor's teardown") for signum in sent]
    return allowed


def _allowed(case: Case, *, injected: bool) -> list[Allowed]:
    normal = _normal(case)
    if not injected:
        return normal
    tag = case.target.partition(":")[2]
    if case.fault in ("none", "stopcont", "share-removed") or case.target == "watchdog":
        return normal
    if case.fault == "kill9" and case.target == "supervisor":
        killed = Allowed(-signal.SIGKILL, "", "the supervisor was killed")
        # During teardown it may have exited (unreaped) just before the SIGKILL landed.
        return [killed, *normal] if case.phase == "teardown" else [killed]
    if case.fault == "signal":
        by_handler = Allowed(128 + case.signum, _signal_message(case.signum), "stopped by the signal")
        if case.phase == "start":
            # Before the event loop installs its handler the default action applies: SIGTERM and
            # SIGHUP kill (the watchdog cleans up); SIGINT kills before Python's own handler is
            # installed, and raises KeyboardInterrupt (exit 130) after.
            early = [Allowed(-case.signum, "", "killed by the signal before handling it")]
            if case.signum == signal.SIGINT:
                early.append(Allowed(130, "", "KeyboardInterrupt before the event loop"))
                # CPython's own startup (site.py) does not survive a KeyboardInterrupt; nothing of
                # ours exists yet then.
                early.append(Allowed(1, r"Fatal Python error: init_import_site", "CPython still starting"))
            return [by_handler, *early]
        if case.phase == "teardown":
            # Past its teardown the supervisor has left its handlers: the default action applies.
            late = Allowed(-case.signum, "", "the signal came after the teardown")
            return [*normal, by_handler, late] if case.end != "sigterm" else [*normal, late]
        return [by_handler]
    if case.fault == "kill9" and case.target == "runner":
        if case.phase == "teardown":
            return [*normal, _runner_killed(case)] if case.end != "sigterm" else normal
        return [_runner_killed(case)]
    if case.fault == "kill9":  # a virtiofsd or its sandbox child
        if case.phase == "teardown":
            return [*normal, _share_died(tag)] if case.end != "sigterm" else normal
        return [_share_died(tag)]
    if case.fault == "exits-early":
        return [_share_died(tag)]
    if case.fault == "bad-arg":
        if case.builtin:
            return [Allowed(76, r"QEMU .*exited with status 1 .*-bogus-option: invalid option", "bad arg")]
        return [Allowed(1, r"-bogus-option: invalid option", "bad argument")]
    if case.fault == "base-unwritable":
        return [
            Allowed(
                73,
                r"cannot create the (runtime|instance) dir|the runtime dir .* cannot be created",
                "runtime dir unwritable",
            )
        ]
    if case.fault == "dir-readonly":
        if case.phase == "start":
            return [
                *normal,
                Allowed(73, r"runtime dir|instance dir", "instance dir made read-only"),
                Allowed(76 if case.builtin else 1, r"Permission denied", "QEMU could not open its file"),
            ]
        return normal
    raise AssertionError(f"no expectation for {case}")


# ---- playing a case -------------------------------------------------------------------------


@dataclass
class Result:
    code: int | None = None
    stdout: bytes = b""
    stderr: str = ""
    injected: str = ""  # what was actually done, for the failure report
    did_inject: bool = False
    left_processes: list[str] = field(default_factory=list)
    left_files: list[str] = field(default_factory=list)
    tty_changed: bool = False
    hung: bool = False


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def find_target(supervisor: int, target: str) -> int | None:
    kind, _, tag = target.partition(":")
    if kind == "supervisor":
        return supervisor
    for pid in _children(supervisor):
        cmdline = _cmdline(pid)
        if kind == "watchdog":
            if is_watchdog(pid):
                return pid
        elif kind == "runner" and FAKE_QEMU.name in cmdline and " -name " in cmdline:
            return pid  # the runner itself, not the preflight's `-version` / `-machine help` probes
        elif FAKE_VIRTIOFSD.name in cmdline and f"/{tag} " in cmdline + " ":
            if kind == "virtiofsd":
                return pid
            sandbox = _children(pid)
            if sandbox:
                return sandbox[0]
    return None


def case_processes(case_id: str) -> list[str]:
    """Every live process whose environment carries this case's id."""
    return [
        f"{pid} {_cmdline(pid)}"
        for pid, _ in processes_with_env(f"{CASE_ENV}={case_id}".encode(), exact=True)
    ]


class Player:
    """Plays one case in its own directory; used from a worker thread."""

    def __init__(self, case: Case, root: Path, user_ids: tuple[int, int] | None) -> None:
        self.case = case
        self.dir = root / f"c{case.index}"
        self.runtime = self.dir / "rt"
        self.user_ids = user_ids if case.user else None
        self.result = Result()
        self.proc: subprocess.Popen[bytes] | None = None
        self.out_fd = -1
        self.master = -1
        self.slave = -1

    # -- setup --

    def _config(self) -> str:
        case = self.case
        lines = [f'runtime-dir = "{self.runtime}"']
        for tag in TAGS:
            lines += ["[[shares]]", f'tag = "{tag}"', f'source = "{self.dir / "shares" / tag}"']
        lines += ["[qemu]", f'binary = "{FAKE_QEMU}"']
        if not case.builtin:
            lines.append(f'kernel = "{self.dir / "kernel"}"')
        if case.fault == "bad-arg":
            lines.append('extra-args = ["-bogus-option"]')
        lines += ["[virtiofsd]", f'binary = "{FAKE_VIRTIOFSD}"', f'socket-mode = "{case.socket_mode}"']
        lines += ["[timeouts]", "graceful-stop = 0.5", "quit = 0.5", "kill-grace = 0.3", "socket-ready = 3"]
        return "\n".join(lines) + "\n"

    def setup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        for tag in TAGS:
            (self.dir / "shares" / tag).mkdir(parents=True)
        (self.dir / "kernel").write_bytes(b"not a kernel: the stub QEMU never reads it\n")
        (self.dir / "config.toml").write_text(self._config())
        if self.case.fault == "base-unwritable":
            # A runtime base whose parent this user may not write: it cannot be created.
            self.runtime = self.dir / "locked" / "rt"
            self.runtime.parent.mkdir(mode=0o555)
            (self.dir / "config.toml").write_text(self._config())
        if self.user_ids is not None:
            for path in [self.dir, *self.dir.rglob("*")]:
                os.lchown(path, *self.user_ids)
        if self.case.fault == "base-unwritable":
            self.runtime.parent.chmod(0o555)

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "LANG": "C.UTF-8",
            "HOME": str(self.dir),
            "AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE),
            CASE_ENV: self.case.case_id,
            "STUB_QEMU_STATUS": str(GUEST_STATUS),
            "STUB_QEMU": self.case.qemu_behaviour,
            "STUB_QEMU_FLOOD_MB": "1",  # past the status port's 64 KiB cap, without slowing the case
            "STUB_VIRTIOFSD": self.case.virtiofsd_behaviour,
        }
        return env

    def launch(self) -> None:
        argv = [*supervisor_argv(), "run", "--config", str(self.dir / "config.toml"), "--log-format", "human"]
        ids = self.user_ids
        if self.case.tty:
            self.master, self.slave = os.openpty()
            self.saved_tty = termios.tcgetattr(self.slave)
            if self.user_ids is not None:
                os.fchown(self.slave, *self.user_ids)
            stdin: int = self.slave
            stdout: int = self.slave
        else:
            stdin, stdout = subprocess.DEVNULL, subprocess.PIPE
        self.proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=self._env(),
            cwd=self.dir,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
        )
        if self.case.tty:
            self.out_fd = self.master
        else:
            assert self.proc.stdout is not None
            self.out_fd = self.proc.stdout.fileno()

    # -- during the run --

    def alive(self) -> bool:
        assert self.proc is not None
        return self.proc.poll() is None

    def pump(self, timeout: float) -> None:
        """Read what the supervisor printed, for up to `timeout` seconds (stops at EOF)."""
        if self.out_fd < 0:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self.out_fd], [], [], timeout)
        if ready:
            try:
                chunk = os.read(self.out_fd, 65536)
            except OSError:  # EIO: a PTY whose other side is closed
                chunk = b""
            if chunk:
                self.result.stdout += chunk
            elif not self.case.tty:
                self.out_fd = -1

    def wait_marker(self, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while MARKER not in self.result.stdout:
            if not self.alive() or time.monotonic() > deadline:
                return False
            self.pump(0.05)
        return True

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.pump(min(left, 0.05))

    def wait_for(self, target: str, timeout: float = 20.0) -> int | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            pid = find_target(self.proc.pid, target)
            if pid is not None:
                return pid
            time.sleep(0.002)
        return None

    def inject(self) -> None:
        case = self.case
        assert self.proc is not None
        if case.fault in ("kill9", "stopcont", "signal"):
            pid = None
            if case.phase == "start" and case.target != "supervisor":
                pid = self.wait_for(case.target)
            self.sleep(case.delay)
            if pid is None:
                pid = find_target(self.proc.pid, case.target)
            if pid is None or not self.alive():
                self.result.injected = f"{case.target} not found"
                return
            try:
                if case.fault == "kill9":
                    os.kill(pid, signal.SIGKILL)
                elif case.fault == "signal":
                    os.kill(pid, case.signum)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    self.sleep(case.pause)
                    os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                self.result.injected = f"{case.target} (pid {pid}) already gone"
                return
            self.result.injected = f"{case.fault} {case.target} pid {pid}"
            self.result.did_inject = True
        elif case.fault == "share-removed":
            self.sleep(case.delay)
            shutil.rmtree(self.dir / "shares" / case.target.partition(":")[2])
            self.result.injected = "share dir removed"
            self.result.did_inject = True
        elif case.fault == "dir-readonly":
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.alive():
                dirs = [p for p in self.runtime.glob("agentvm-*") if p.is_dir()]
                if dirs:
                    if case.phase != "start":
                        self.sleep(case.delay)
                    with contextlib.suppress(FileNotFoundError):
                        dirs[0].chmod(0o500)
                        self.result.injected = f"chmod 500 {dirs[0].name}"
                        self.result.did_inject = True
                    return
                time.sleep(0.002)
            self.result.injected = "instance dir not found"

    def settle(self) -> None:
        """Give the supervisor time to act on the fault before the case's own end comes."""
        # A killed child ends the run by itself; on 2 busy cores noticing it can take a while.
        ends_run = self.case.fault == "kill9" and self.case.target != "watchdog" and self.result.did_inject
        deadline = time.monotonic() + (5.0 if ends_run else 0.1)
        while self.alive() and time.monotonic() < deadline:
            self.pump(0.02)

    def trigger_end(self) -> None:
        case = self.case
        assert self.proc is not None
        if not self.alive():
            return
        if case.end == "sigterm":
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        elif case.end == "escape":
            os.write(self.master, b"\x1d.")
        else:
            runner = find_target(self.proc.pid, "runner")
            if runner is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(runner, signal.SIGUSR1)

    def play(self) -> Result:
        case = self.case
        self.setup()
        self.launch()
        try:
            if case.phase == "start":
                self.inject()
                if self.wait_marker():
                    self.settle()
                    self.trigger_end()
            elif case.phase == "running":
                if self.wait_marker():
                    self.inject()
                    self.settle()
                    self.trigger_end()
            elif self.wait_marker():
                self.trigger_end()
                self.inject()
            self.finish()
        finally:
            self.cleanup()
        return self.result

    def finish(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while self.alive() and time.monotonic() < deadline:
            self.pump(0.05)
        if self.alive():
            self.result.hung = True
            self.proc.kill()
        out, err = self.proc.communicate(timeout=30)
        self.result.stdout += out or b""
        self.result.code = self.proc.returncode
        self.result.stderr = err.decode(errors="replace")
        deadline = time.monotonic() + 10
        while (left := case_processes(self.case.case_id)) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.result.left_processes = left
        if self.case.tty:
            self.result.tty_changed = termios.tcgetattr(self.slave) != self.saved_tty
        with contextlib.suppress(OSError):
            self.runtime.parent.chmod(0o755)
        if self.runtime.exists():
            self.result.left_files = sorted(str(p) for p in self.runtime.rglob("*"))

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in case_processes(self.case.case_id):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.split()[0]), signal.SIGKILL)
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        for path in [self.dir, *self.dir.rglob("*")] if self.dir.exists() else []:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.chmod(0o755)
        shutil.rmtree(self.dir, ignore_errors=True)


def check(case: Case, result: Result) -> list[str]:
    """What went wrong in a played case (empty: nothing)."""
    problems = []
    if result.hung:
        problems.append(f"the supervisor did not exit within {EXIT_DEADLINE_S:g} s")
    if result.left_processes:
        problems.append(f"processes left: {result.left_processes}")
    if result.left_files:
        problems.append(f"files left in the runtime dir: {result.left_files}")
    if result.tty_changed:
        problems.append("the terminal's settings changed")
    stderr = result.stderr
    # CPython's own startup (site.py) prints a traceback on Ctrl-C; nothing of ours ran yet then.
    traceback = "Traceback" in stderr and "Fatal Python error: init_import_site" not in stderr
    if traceback or "internal error" in stderr or result.code == 70:
        problems.append("an internal error")
    paragraphs = [line for line in stderr.splitlines() if line.startswith("agentvm-supervise: ")]
    if len(paragraphs) > 1:
        problems.append(f"{len(paragraphs)} error paragraphs instead of one")
    injected = result.did_inject or case.fault in ("exits-early", "bad-arg", "base-unwritable", "none")
    allowed = allowed_outcomes(case, injected=injected)
    if not any(result.code == a.code and re.search(a.message, stderr, re.MULTILINE) for a in allowed):
        wanted = "; ".join(f"{a.code} ({a.why}) matching {a.message!r}" for a in allowed)
        problems.append(f"exit status {result.code}, wanted one of: {wanted}")
    return problems


def report(case: Case, result: Result, problems: list[str]) -> str:
    return (
        f"{case.describe()}\n  injected: {result.injected or 'nothing'}\n  problems: "
        + "\n    ".join(problems)
        + f"\n  stderr: {result.stderr.strip()[-1500:]!r}"
        + f"\n  repro: AGENTVM_FAULT_SEED={case.seed} AGENTVM_FAULT_ONLY={case.index} "
        "./test.sh tests/test_faults.py"
    )
