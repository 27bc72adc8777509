"""The bench's workspace, its launchers and its measurements.

Every launcher gets the same three real virtiofsd (the built-in guest's Debian 13 one), the same
virtiofsd flags, the same share dirs, and the same stub runner (stub_runner.c): a C program that
records when it was exec'd and when it exits, and connects to the vhost-user sockets like QEMU.
Times are CLOCK_MONOTONIC in ns on both sides (time.monotonic_ns here, clock_gettime there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor import guest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TAGS = ("work", "home", "data")
RUN_ENV = "AGENTVM_BENCH_RUN"  # in every process a run starts: how leftovers are found
CACHE = Path(os.environ.get("AGENTVM_SUPERVISE_CACHE", "/var/tmp/agentvm-supervise-test-cache"))
REAL_QEMU = "/usr/bin/qemu-system-x86_64"  # answers the preflight's probes for the stub runner
PREFLIGHT_NOTE = (
    f"preflight: as users get it (the stub runner answers QEMU's probes by exec'ing the real QEMU, "
    f"{REAL_QEMU}, so they cost what they cost a user)"
)


def virtiofsd_flags(source: Path) -> list[str]:
    """What agentvm-supervise gives a share's virtiofsd as this user (uid-mapping auto)."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        owner = source.stat()
        ids = [f"--translate-uid=map:1000:{owner.st_uid}:1", f"--translate-gid=map:1000:{owner.st_gid}:1"]
    else:
        ids = [
            f"--uid-map=:0:{uid}:1:",
            f"--gid-map=:0:{gid}:1:",
            "--translate-uid=map:1000:0:1",
            "--translate-gid=map:1000:0:1",
        ]
    return [f"--shared-dir={source}", "--sandbox=namespace", "--cache=auto", *ids, "--xattr"]


def qemu_like_argv(sockets: Sequence[Path]) -> list[str]:
    """The part of a QEMU command line the stub runner reads: one vhost-user chardev per share."""
    argv: list[str] = []
    for index, (tag, path) in enumerate(zip(TAGS, sockets, strict=True)):
        argv += ["-chardev", f"socket,id=fs{index},path={path}", "-device", f"vhost-user-fs-pci,tag={tag}"]
    return argv


@dataclass
class Marks:
    pid: int = 0
    exec_ns: int = 0
    connected_ns: int = 0
    exit_ns: int = 0

    @classmethod
    def read(cls, path: Path) -> Marks:
        marks = cls()
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "pid":
                    marks.pid = int(value)
                elif key in ("exec", "connected", "exit"):
                    setattr(marks, f"{key}_ns", int(value))
        return marks


def run_processes(run_id: str) -> list[str]:
    """Live processes (not zombies) whose environment carries this run's id."""
    needle = f"{RUN_ENV}={run_id}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes() + b"\0":
                continue
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z":
            found.append(f"{entry.name} {cmdline[:80]}")
    return found


@dataclass
class Run:
    """One launch: its dir (marks file, runtime dir, configs) and its environment."""

    bench: Bench
    name: str
    hold: bool = False
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir = self.bench.root / "runs" / self.name
        self.dir.mkdir(parents=True)
        self.runtime.mkdir(mode=0o700)

    @property
    def runtime(self) -> Path:
        return self.dir / "rt"

    @property
    def marks_path(self) -> Path:
        return self.dir / "marks"

    def marks(self) -> Marks:
        return Marks.read(self.marks_path)

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.bench.root),
            "AGENTVM_SUPERVISE_CACHE": str(CACHE),
            "BENCH_MARKS": str(self.marks_path),
            "BENCH_HOLD": "1" if self.hold else "0",
            "BENCH_QEMU": REAL_QEMU,
            RUN_ENV: self.name,
            # Where agentvm-supervise keeps what the preflight learnt (facts.py): shared by the
            # runs (a user's second start), or the run's own for a first start.
            "XDG_STATE_HOME": str(
                (self.dir if self.name.startswith("agentvm-cold") else self.bench.root) / "state"
            ),
        }

    def sockets(self) -> list[Path]:
        return [self.runtime / f"{tag}.sock" for tag in TAGS]

    def leftovers(self) -> list[str]:
        files = sorted(str(path.relative_to(self.runtime)) for path in self.runtime.rglob("*"))
        return run_processes(self.name) + files


@dataclass
class Bench:
    root: Path
    virtiofsd: str
    stub: Path
    supervise: list[str]
    supervisord: str | None
    kernel: Path
    shares: list[Path]
    counter: int = 0
    baseline: list[str] | None = None  # --baseline: another checkout's agentvm-supervise

    @classmethod
    @contextlib.contextmanager
    def create(cls) -> Iterator[Bench]:
        root = Path(f"/var/tmp/agentvm-bench-{os.getpid()}")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(mode=0o755)
        try:
            assets = guest.ensure_assets({"AGENTVM_SUPERVISE_CACHE": str(CACHE)})
            stub = root / "stub-runner"
            compiler = shutil.which("cc") or shutil.which("gcc")
            if compiler is None:
                raise SystemExit("bench: a C compiler is needed for the stub runner: apt-get install gcc")
            subprocess.run([compiler, "-O2", "-o", str(stub), str(HERE / "stub_runner.c")], check=True)
            console_script = Path(sys.executable).parent / "agentvm-supervise"
            supervise = (
                [str(console_script)] if console_script.exists() else [sys.executable, "-m", "supervisor"]
            )
            supervisord = shutil.which(
                "supervisord", path=f"{REPO / '.venv-bench' / 'bin'}:{os.environ['PATH']}"
            )
            shares = [root / "shares" / tag for tag in TAGS]
            for share in shares:
                share.mkdir(parents=True)
            kernel = root / "kernel"
            kernel.write_text("not a kernel: the stub runner never reads it\n")
            yield cls(root, str(assets.virtiofsd), stub, supervise, supervisord, kernel, shares)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def new_run(self, kind: str, *, hold: bool = False) -> Run:
        self.counter += 1
        return Run(self, f"{kind}-{os.getpid()}-{self.counter}", hold=hold)

    # ---- the launchers: argv for one run ------------------------------------------------------

    def agentvm_argv(
        self,
        run: Run,
        socket_mode: str = "fd",
        runtime: Path | None = None,
        supervise: list[str] | None = None,
    ) -> list[str]:
        lines = [f'runtime-dir = "{runtime or run.runtime}"', 'name = "bench"']
        for tag, source in zip(TAGS, self.shares, strict=True):
            lines += ["[[shares]]", f'tag = "{tag}"', f'source = "{source}"']
        lines += ["[qemu]", f'binary = "{self.stub}"', f'kernel = "{self.kernel}"', 'accel = "tcg"']
        lines += ["[virtiofsd]", f'binary = "{self.virtiofsd}"', f'socket-mode = "{socket_mode}"']
        config = run.dir / "agentvm.toml"
        config.write_text("\n".join(lines) + "\n")
        return [*(supervise or self.supervise), "run", "--config", str(config)]

    def bash_argv(self, run: Run) -> list[str]:
        return [
            "bash", str(HERE / "seed_launcher.sh"), str(run.runtime), self.virtiofsd,
            *map(str, self.shares), "--", str(self.stub), *qemu_like_argv(run.sockets()),
        ]  # fmt: skip

    def supervisord_argv(self, run: Run) -> list[str]:
        assert self.supervisord is not None
        fifo = run.dir / "ready"
        lines = [
            "[supervisord]",
            "nodaemon=true",
            f"logfile={run.dir}/supervisord.log",
            f"pidfile={run.dir}/supervisord.pid",
            f"childlogdir={run.dir}",
        ]
        if os.getuid() == 0:
            lines.append("user=root")  # as microvm.nix has it
        lines += [
            "[eventlistener:notify]",
            f"command={sys.executable} {HERE / 'supervisord_listener.py'} {len(TAGS)} {fifo}",
            "events=PROCESS_STATE",
            f"buffer_size={(1 + len(TAGS)) * 16}",
        ]
        for tag, source, sock in zip(TAGS, self.shares, run.sockets(), strict=True):
            flags = " ".join(virtiofsd_flags(source))
            lines += [f"[program:virtiofsd-{tag}]", f"command={self.virtiofsd} --socket-path={sock} {flags}"]
        config = run.dir / "supervisord.conf"
        config.write_text("\n".join(lines) + "\n")
        return [
            "bash", str(HERE / "supervisord_launcher.sh"), self.supervisord, str(config), str(fifo), "--",
            str(self.stub), *qemu_like_argv(run.sockets()),
        ]  # fmt: skip

    def argv(self, launcher: str, run: Run) -> list[str]:
        if launcher in ("agentvm", "agentvm-cold"):
            return self.agentvm_argv(run)
        if launcher == "agentvm-before":
            assert self.baseline is not None
            return self.agentvm_argv(run, supervise=self.baseline)
        if launcher == "agentvm-path":
            return self.agentvm_argv(run, socket_mode="path")
        if launcher == "bash":
            return self.bash_argv(run)
        if launcher == "supervisord":
            return self.supervisord_argv(run)
        raise ValueError(launcher)

    def spawn(self, argv: Sequence[str], run: Run) -> subprocess.Popen[bytes]:
        log = (run.dir / "stderr").open("wb")
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=run.env(),
                cwd=run.dir,
            )
        finally:
            log.close()


# ---- measurements ------------------------------------------------------------------------------


@dataclass
class LaunchSample:
    start_ms: float  # launcher exec -> runner exec
    start_cpu_ms: float  # CPU time of the launcher's own process (all its threads) by then
    teardown_ms: float  # runner exit -> every process the launcher started reaped, no socket left
    exit_ms: float  # runner exit -> the launcher's own exit
    status: int
    left: list[str]  # processes, then files under the runtime dir
    left_processes: int = 0


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def launch_once(bench: Bench, launcher: str, timeout: float = 120.0) -> LaunchSample:
    """One start and teardown with three shares; the runner holds until every process the
    launcher started is known, then exits, and teardown is timed until they are all reaped and
    no socket is left (or, for launchers that leave sockets, until the launcher exits)."""
    run = bench.new_run(launcher, hold=True)
    argv = bench.argv(launcher, run)
    started = time.monotonic_ns()
    proc = bench.spawn(argv, run)
    try:
        wait_for(lambda: bool(run.marks().connected_ns) or proc.poll() is not None, timeout, "no runner")
        marks = run.marks()
        if not marks.exec_ns:
            detail = (run.dir / "stderr").read_text(errors="replace")[-800:]
            raise RuntimeError(f"{launcher}: the runner never ran (status {proc.wait()}): {detail}")
        # On a shared machine wall times wander with the load; the CPU the launcher itself spent
        # to get the runner started (not its children's) is a steadier figure of its own work.
        start_cpu_ms = proc_stats(proc.pid).cpu_ns / 1e6
        tree = [pid for pid in descendants(proc.pid) if pid != marks.pid]
        os.kill(marks.pid, signal.SIGUSR1)
        clean = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reaped = not any(os.path.exists(f"/proc/{pid}") for pid in tree)  # noqa: PTH110
            if not clean and reaped and (proc.poll() is not None or not any(run.runtime.rglob("*.sock"))):
                clean = time.monotonic_ns()
            if proc.poll() is not None:
                break
            time.sleep(0.0005)
        status = proc.wait(timeout=timeout)
        ended = time.monotonic_ns()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    marks = run.marks()
    processes = run_processes(run.name)
    left = run.leftovers()
    _kill_leftovers(run)
    return LaunchSample(
        start_ms=(marks.exec_ns - started) / 1e6,
        start_cpu_ms=start_cpu_ms,
        teardown_ms=((clean or ended) - marks.exit_ns) / 1e6,
        exit_ms=(ended - marks.exit_ns) / 1e6,
        status=status,
        left=left,
        left_processes=len(processes),
    )


def _kill_leftovers(run: Run) -> None:
    for line in run_processes(run.name):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(line.split()[0]), signal.SIGKILL)


@dataclass
class FloorSample:
    ready_ms: dict[str, float]  # each virtiofsd's socket, started in parallel, tight stat loop
    kill_ms: float  # SIGKILL to all three -> all reaped and their files removed


def floor_once(bench: Bench) -> FloorSample:
    run = bench.new_run("floor")
    sockets = run.sockets()
    started = time.monotonic_ns()
    procs = [
        subprocess.Popen(
            [bench.virtiofsd, f"--socket-path={sock}", *virtiofsd_flags(source)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=run.env(),
        )
        for sock, source in zip(sockets, bench.shares, strict=True)
    ]
    ready: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while len(ready) < len(TAGS) and time.monotonic() < deadline:
        for tag, sock in zip(TAGS, sockets, strict=True):
            if tag not in ready and os.path.exists(sock):  # noqa: PTH110 - the cheapest stat there is
                ready[tag] = (time.monotonic_ns() - started) / 1e6
    killed = time.monotonic_ns()
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()
    for path in list(run.runtime.iterdir()):
        path.unlink()
    return FloorSample(ready, (time.monotonic_ns() - killed) / 1e6)


def python_startup_ms(bench: Bench) -> float:
    """exec -> exit of `agentvm-supervise --version`: the interpreter and the supervisor's imports."""
    started = time.monotonic_ns()
    subprocess.run([*bench.supervise, "--version"], stdout=subprocess.DEVNULL, check=True)
    return (time.monotonic_ns() - started) / 1e6


# ---- /proc accounting for the idle test ----------------------------------------------------------


@dataclass(frozen=True)
class ProcStats:
    switches: int  # voluntary + nonvoluntary context switches, all threads
    cpu_ns: int  # time on CPU (schedstat), all threads
    rss_kib: int
    pss_kib: int  # RSS with pages shared with other processes (a fork's parent) split among them
    threads: int


def proc_stats(pid: int) -> ProcStats:
    switches = cpu = 0
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    for task in tasks:
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
            cpu += int((task / "schedstat").read_text().split()[0])
    rss = pss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return ProcStats(switches, cpu, rss, pss, len(tasks))


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: {what} within {timeout:g} s")
        time.sleep(0.01)
