"""`python -m bench`: agentvm-supervise side by side with the launchers people use, in one run.

Prints a table of medians and same-run ratios and writes the samples as JSON to bench/results/
(`--compare` an earlier file to see both). See the README, "Bench", for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from bench import core, realguest
from bench.core import Bench

RESULTS = Path(__file__).resolve().parent / "results"
LAUNCHERS = {
    "agentvm": "agentvm-supervise (--fd, default)",
    "agentvm-cold": "agentvm-supervise, first start (preflight probes run)",
    "agentvm-path": "agentvm-supervise (--socket-path + inotify)",
    "agentvm-before": "agentvm-supervise of --baseline (same config)",
    "bash": "seed bash launcher ([ -S ] every 100 ms)",
    "supervisord": "supervisord + RUNNING-event listener",
}


class Stat(msgspec.Struct):
    median: float
    p95: float
    low: float
    high: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return cls(statistics.median(ordered), p95, ordered[0], ordered[-1], list(samples))


class Machine(msgspec.Struct):
    date: str
    hostname: str
    cpu: str
    cores: int
    kernel: str
    python: str
    load_before: list[float]
    load_after: list[float] = []


class Idle(msgspec.Struct):
    what: str
    wakeups_per_s: float
    cpu_ms: float
    rss_mib: float
    pss_mib: float
    threads: int


class Scale(msgspec.Struct, kw_only=True):
    instances: int
    launcher: str = "agentvm"
    start_all_ms: float  # first exec -> the last runner exec'd
    start_median_ms: float  # per instance: launch -> its runner's exec
    teardown_all_ms: float  # SIGUSR1 to every runner -> every supervisor exited
    instance_dirs: int
    sockets: int
    distinct: bool  # one dir per instance, each with the same socket names (so none shared)
    statuses: list[int]
    left: list[str]


class Results(msgspec.Struct):
    machine: Machine
    version: int = 1
    start_ms: dict[str, Stat] = {}
    start_cpu_ms: dict[str, Stat] = {}  # the launcher process's own CPU time by the runner's exec
    teardown_ms: dict[str, Stat] = {}  # runner exit -> its processes reaped, no socket left
    exit_ms: dict[str, Stat] = {}  # runner exit -> the launcher's own exit
    left_behind: dict[str, list[str]] = {}
    floor_ready_ms: dict[str, Stat] = {}
    floor_kill_ms: Stat | None = None
    python_startup_ms: Stat | None = None
    idle_seconds: float = 0.0
    idle: list[Idle] = []
    scale: list[Scale] = []
    guest_ms: dict[str, Stat] = {}
    ratios: dict[str, float] = {}


def _machine() -> Machine:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return Machine(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        hostname=platform.node(),
        cpu=cpu,
        cores=os.cpu_count() or 0,
        kernel=platform.release(),
        python=platform.python_version(),
        load_before=list(os.getloadavg()),
    )


class Failed(Exception):
    """A launcher failed or left something behind: the bench's only failure (figures never are)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- the sections ----------------------------------------------------------------------------------


def _own(name: str) -> bool:
    return name.startswith("agentvm")


def start_and_teardown(
    bench: Bench, results: Results, runs: int, launchers: list[str], problems: list[str]
) -> None:
    starts: dict[str, list[float]] = {name: [] for name in launchers}
    cpus: dict[str, list[float]] = {name: [] for name in launchers}
    teardowns: dict[str, list[float]] = {name: [] for name in launchers}
    exits: dict[str, list[float]] = {name: [] for name in launchers}
    floors: dict[str, list[float]] = {tag: [] for tag in (*core.TAGS, "max")}
    kills: list[float] = []
    pythons: list[float] = []
    for name in launchers:  # one unmeasured start each: page cache, and the facts a user's 2nd start has
        core.launch_once(bench, name)
    for round_ in range(runs):
        # Rotate the order each round: load from the other developers hits every launcher alike.
        order = launchers[round_ % len(launchers) :] + launchers[: round_ % len(launchers)]
        for name in order:
            sample = core.launch_once(bench, name)
            if sample.status != 0:
                problems.append(f"{name} exited with status {sample.status}")
                continue
            # Ours must leave nothing; the peers leave files by design (reported), never processes.
            if sample.left and (_own(name) or sample.left_processes):
                problems.append(f"{name} left behind: {', '.join(sample.left)}")
            starts[name].append(sample.start_ms)
            cpus[name].append(sample.start_cpu_ms)
            teardowns[name].append(sample.teardown_ms)
            exits[name].append(sample.exit_ms)
            if name not in results.left_behind:
                results.left_behind[name] = sample.left
        floor = core.floor_once(bench)
        for tag, value in floor.ready_ms.items():
            floors[tag].append(value)
        floors["max"].append(max(floor.ready_ms.values()))
        kills.append(floor.kill_ms)
        pythons.append(core.python_startup_ms(bench))
        if problems:
            raise Failed(problems)
        _say(f"  round {round_ + 1}/{runs}: " + ", ".join(f"{n} {starts[n][-1]:.0f} ms" for n in launchers))
    results.start_ms = {name: Stat.of(values) for name, values in starts.items() if values}
    results.start_cpu_ms = {name: Stat.of(values) for name, values in cpus.items() if values}
    results.teardown_ms = {name: Stat.of(values) for name, values in teardowns.items()}
    results.exit_ms = {name: Stat.of(values) for name, values in exits.items()}
    results.floor_ready_ms = {tag: Stat.of(values) for tag, values in floors.items()}
    results.floor_kill_ms = Stat.of(kills)
    results.python_startup_ms = Stat.of(pythons)


def _watchdog_of(pid: int) -> int | None:
    """The supervisor's watchdog: the child running supervisor/watchdog_main.py."""
    return next((child for child in core.children(pid) if "/watchdog_main.py " in core.cmdline(child)), None)


def _connected(run: core.Run) -> bool:
    return run.marks().connected_ns != 0


def idle(bench: Bench, results: Results, seconds: float, launchers: list[str]) -> None:
    held: list[tuple[str, core.Run, subprocess.Popen[bytes]]] = []
    vm: subprocess.Popen[bytes] | None = None
    try:
        for name in launchers:
            run = bench.new_run(f"idle-{name}", hold=True)
            held.append((name, run, bench.spawn(bench.argv(name, run), run)))
        work = bench.root / "guest" / "idle" / "work"
        work.mkdir(parents=True)
        vm = subprocess.Popen(
            [*bench.supervise, "run", "--name", "bench-idle", "--work-dir", str(work),
             "--agent-home", str(work.parent / "home"), "--runtime-dir", str(work.parent / "rt"),
             "--accel", "tcg", "--", "sh", "-c", "echo IDLE-READY; sleep 3600"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "AGENTVM_SUPERVISE_CACHE": str(core.CACHE)},
        )  # fmt: skip
        assert vm.stdout is not None
        realguest._read_until(vm.stdout.fileno(), b"IDLE-READY", time.monotonic() + 180, vm)
        for name, run, _ in held:
            core.wait_for(functools.partial(_connected, run), 60, f"the {name} runner did not start")
        time.sleep(2.0)  # let start-up work (thread pools, buffered logs) settle
        watched: dict[str, int] = {"agentvm-supervise, real guest idle": vm.pid}
        watchdog = _watchdog_of(vm.pid)
        if watchdog is not None:
            watched["its watchdog"] = watchdog
        for name, _, proc in held:
            if name == "supervisord":
                daemon = next(c for c in core.children(proc.pid) if "supervisord" in core.cmdline(c))
                watched["supervisord (stub runner)"] = daemon
            else:
                watched[f"{LAUNCHERS[name].split(' (')[0]} (stub runner)"] = proc.pid
        before = {what: core.proc_stats(pid) for what, pid in watched.items()}
        started = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        after = {what: core.proc_stats(pid) for what, pid in watched.items()}
        results.idle_seconds = round(elapsed, 1)
        results.idle = [
            Idle(
                what=what,
                wakeups_per_s=(after[what].switches - before[what].switches) / elapsed,
                cpu_ms=(after[what].cpu_ns - before[what].cpu_ns) / 1e6,
                rss_mib=after[what].rss_kib / 1024,
                pss_mib=after[what].pss_kib / 1024,
                threads=after[what].threads,
            )
            for what in watched
        ]
    finally:
        for _, run, _ in held:
            with contextlib.suppress(ProcessLookupError):
                if run.marks().pid:
                    os.kill(run.marks().pid, signal.SIGUSR1)
        if vm is not None:
            vm.send_signal(signal.SIGTERM)
            vm.communicate(timeout=120)
        for _, _, proc in held:
            proc.wait(timeout=60)


def _all_started(pairs: list[tuple[core.Run, subprocess.Popen[bytes]]]) -> bool:
    return all(run.marks().connected_ns or proc.poll() is not None for run, proc in pairs)


def scale(bench: Bench, results: Results, sizes: list[int], problems: list[str]) -> None:
    variants = [("agentvm", bench.supervise)] + (
        [("agentvm-before", bench.baseline)] if bench.baseline else []
    )
    for size, (launcher, supervise) in itertools.product(sizes, variants):
        base = bench.root / f"scale-{size}-{launcher}"
        base.mkdir(mode=0o700)
        runs = [bench.new_run(f"scale{size}", hold=True) for _ in range(size)]
        argvs = [bench.agentvm_argv(run, runtime=base, supervise=supervise) for run in runs]
        started = time.monotonic_ns()
        procs = [bench.spawn(argv, run) for argv, run in zip(argvs, runs, strict=True)]
        try:
            pairs = list(zip(runs, procs, strict=True))
            core.wait_for(functools.partial(_all_started, pairs), 300, f"{size} instances did not start")
            execs = [(run.marks().exec_ns - started) / 1e6 for run in runs]
            dirs = [path for path in base.iterdir() if path.is_dir()]
            sockets = [path for path in base.rglob("*.sock")]
            names = {frozenset(p.name for p in path.glob("*.sock")) for path in dirs}
            distinct = len(dirs) == size and len(names) == 1 and bool(next(iter(names)))
            released = time.monotonic_ns()
            for run in runs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(run.marks().pid, signal.SIGUSR1)
            statuses = [proc.wait(timeout=300) for proc in procs]
            ended = time.monotonic_ns()
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        left = [line for run in runs for line in core.run_processes(run.name)]
        left += [str(path) for path in base.rglob("*")]
        results.scale.append(
            Scale(
                instances=size,
                launcher=launcher,
                start_all_ms=max(execs),
                start_median_ms=statistics.median(execs),
                teardown_all_ms=(ended - released) / 1e6,
                instance_dirs=len(dirs),
                sockets=len(sockets),
                distinct=distinct,
                statuses=statuses,
                left=left,
            )
        )
        torn = (ended - released) / 1e6
        if any(statuses) or left or not results.scale[-1].distinct:
            problems.append(
                f"scale {size}: statuses {sorted(set(statuses))}, "
                f"distinct dirs {results.scale[-1].distinct}, "
                f"left behind: {', '.join(left) or 'nothing'}"
            )
            raise Failed(problems)
        _say(f"  {size} x {launcher}: all started in {max(execs):.0f} ms, torn down in {torn:.0f} ms")


def real_guest(bench: Bench, results: Results, runs: int) -> None:
    supervised: list[float] = []
    hand: list[float] = []
    for index in range(runs):
        for which in ("supervisor", "hand") if index % 2 == 0 else ("hand", "supervisor"):
            if which == "supervisor":
                supervised.append(realguest.through_supervisor(bench, index))
            else:
                hand.append(realguest.by_hand(bench, index))
        _say(f"  guest run {index + 1}/{runs}: supervisor {supervised[-1]:.0f} ms, by hand {hand[-1]:.0f} ms")
    results.guest_ms = {"agentvm": Stat.of(supervised), "by-hand": Stat.of(hand)}


# ---- the report ---------------------------------------------------------------------------------------


def _ratios(results: Results) -> dict[str, float]:
    ratios: dict[str, float] = {}
    start, teardown = results.start_ms, results.teardown_ms
    if "agentvm" in start:
        base = start["agentvm"].median
        for name in ("bash", "supervisord", "agentvm-path", "agentvm-cold", "agentvm-before"):
            if name in start:
                ratios[f"start {name} / agentvm"] = start[name].median / base
        cpu = results.start_cpu_ms
        if "agentvm" in cpu and "agentvm-before" in cpu:
            ratios["start cpu agentvm-before / agentvm"] = (
                cpu["agentvm-before"].median / cpu["agentvm"].median
            )
        if "bash" in start and "agentvm-cold" in start:
            ratios["start bash / agentvm-cold"] = start["bash"].median / start["agentvm-cold"].median
        if results.floor_ready_ms:
            ratios["start agentvm - floor (ms)"] = base - results.floor_ready_ms["max"].median
        if results.python_startup_ms:
            ratios["start agentvm - python startup (ms)"] = base - results.python_startup_ms.median
        for name in ("bash", "supervisord"):
            if name in teardown:
                ratios[f"teardown {name} / agentvm"] = teardown[name].median / teardown["agentvm"].median
    by_size = {(item.instances, item.launcher): item.start_all_ms for item in results.scale}
    for (size, launcher), ms in by_size.items():
        if launcher == "agentvm-before" and (size, "agentvm") in by_size:
            ratios[f"scale {size} all started: agentvm-before / agentvm"] = ms / by_size[(size, "agentvm")]
    if results.guest_ms:
        ratios["guest agentvm / by hand"] = (
            results.guest_ms["agentvm"].median / results.guest_ms["by-hand"].median
        )
    return ratios


def report(results: Results, earlier: Results | None) -> str:
    m = results.machine
    lines = [
        core.PREFLIGHT_NOTE,
        f"agentvm-supervise bench, {m.date}, {m.hostname}: {m.cores} cores ({m.cpu}), Linux {m.kernel}, "
        f"Python {m.python}",
        f"load average before {m.load_before[0]:.2f}, after {m.load_after[0]:.2f} (other work on the machine "
        "inflates absolute times; the ratios are within one run)",
    ]

    def row(label: str, value: str, note: str = "") -> None:
        lines.append(f"  {label:<52} {value:>12}  {note}")

    def was(section: dict[str, Stat] | None, key: str) -> str:
        if earlier is None or section is None or key not in section:
            return ""
        return f"(earlier {section[key].median:.1f})"

    if results.start_ms:
        runs = len(next(iter(results.start_ms.values())).samples)
        lines.append(
            f"\nstart: launcher exec -> runner exec, 3 real virtiofsd, median of {runs} (p95); "
            "the launcher process's own CPU time by then"
        )
        for tag in (*core.TAGS, "max"):
            stat = results.floor_ready_ms[tag]
            row(
                f"floor: virtiofsd[{tag}] socket ready (parallel)",
                f"{stat.median:.1f} ms",
                f"({stat.p95:.1f})",
            )
        assert results.python_startup_ms is not None
        row("python + imports (agentvm-supervise --version)", f"{results.python_startup_ms.median:.1f} ms")
        for name, stat in results.start_ms.items():
            cpu = results.start_cpu_ms.get(name)
            row(
                LAUNCHERS[name],
                f"{stat.median:.1f} ms",
                f"({stat.p95:.1f}) cpu {cpu.median if cpu else 0:.1f} ms "
                f"{was(earlier.start_ms if earlier else None, name)}",
            )
        lines.append(
            "\nteardown: runner exit -> all its processes reaped, no socket left: median (p95); "
            "launcher exit; left behind"
        )
        assert results.floor_kill_ms is not None
        row("floor: SIGKILL three virtiofsd, reap, unlink", f"{results.floor_kill_ms.median:.1f} ms")
        for name, stat in results.teardown_ms.items():
            left = results.left_behind.get(name, [])
            exit_ = results.exit_ms[name].median
            row(
                LAUNCHERS[name],
                f"{stat.median:.1f} ms",
                f"({stat.p95:.1f}) exit {exit_:.0f} ms; left: {', '.join(left) or 'nothing'}",
            )
    if results.idle:
        lines.append(f"\nidle: over {results.idle_seconds:g} s (context switches/s, CPU time, memory)")
        for idle_item in results.idle:
            row(
                idle_item.what,
                f"{idle_item.wakeups_per_s:.2f}/s",
                f"cpu {idle_item.cpu_ms:.1f} ms, rss {idle_item.rss_mib:.1f} MiB "
                f"(pss {idle_item.pss_mib:.1f}), "
                f"{idle_item.threads} threads",
            )
    if results.scale:
        lines.append("\nscale: N agentvm-supervise at once (stub runners, real virtiofsd), one runtime dir")
        for item in results.scale:
            ok = item.distinct
            row(
                f"{item.instances} instances" + ("" if item.launcher == "agentvm" else f" ({item.launcher})"),
                f"{item.start_all_ms:.0f} ms",
                f"all started (median {item.start_median_ms:.0f}, "
                f"{item.start_all_ms / item.instances:.1f} ms per instance); "
                f"torn down {item.teardown_all_ms:.0f} ms; "
                f"{'distinct dirs' if ok else 'COLLISION'}, {item.sockets // max(1, item.instances)} "
                "sockets each; "
                f"statuses {sorted(set(item.statuses))}; left: {len(item.left) or 'nothing'}",
            )
    if results.guest_ms:
        runs = len(results.guest_ms["agentvm"].samples)
        lines.append(f"\nreal guest: exec -> guest marker line, TCG, median of {runs}")
        row("agentvm-supervise run -- CMD", f"{results.guest_ms['agentvm'].median:.0f} ms")
        row("the same command lines by hand", f"{results.guest_ms['by-hand'].median:.0f} ms")
    lines.append("\nratios (same run)")
    for key, value in results.ratios.items():
        old = f"(earlier {earlier.ratios[key]:.2f})" if earlier and key in earlier.ratios else ""
        row(key, f"{value:.2f}" + ("" if "(ms)" in key else "x"), old)
    return "\n".join(lines)


def sections_run(
    bench: Bench,
    *,
    results: Results,
    args: argparse.Namespace,
    sections: set[str],
    launchers: list[str],
    problems: list[str],
) -> None:
    if "start" in sections:
        _say("start and teardown ...")
        start_and_teardown(bench, results, args.runs, launchers, problems)
    if "idle" in sections:
        _say(f"idle ({args.idle_seconds:g} s) ...")
        idle(
            bench,
            results,
            args.idle_seconds,
            [n for n in launchers if n not in ("agentvm-path", "agentvm-cold")],
        )
    if "scale" in sections:
        _say("scale ...")
        scale(bench, results, [int(n) for n in args.scale.split(",")], problems)
    if "guest" in sections:
        _say("real guest ...")
        real_guest(bench, results, args.guest_runs)


def _failed(problems: list[str]) -> int:
    for problem in problems:
        _say(f"bench: FAILED: {problem}")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few rounds of start/teardown and a small scale run, in seconds (./test.sh runs this): "
        "fails if a launcher fails or leaves something behind; figures are printed, not judged",
    )
    parser.add_argument("--runs", type=int, default=7, help="start/teardown rounds (default 7)")
    parser.add_argument("--guest-runs", type=int, default=5, help="real-guest boots each way (default 5)")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="idle window (default 30)")
    parser.add_argument("--scale", default="1,8,16,32", help="instance counts (default 1,8,16,32)")
    parser.add_argument(
        "--only", default="start,idle,scale,guest", help="sections to run (default start,idle,scale,guest)"
    )
    parser.add_argument("--compare", type=Path, help="an earlier results JSON to show next to this run")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also run another checkout's agentvm-supervise (CHECKOUT/.venv/bin) in the same rounds",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where the JSON goes (default bench/results)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.scale, args.only = 3, "4", "start,scale"
    sections = set(args.only.split(","))
    earlier = msgspec.json.decode(args.compare.read_bytes(), type=Results) if args.compare else None
    results = Results(machine=_machine())
    begun = time.monotonic()
    problems: list[str] = []
    with Bench.create() as bench:
        if args.baseline is not None:
            bench.baseline = [str(args.baseline.resolve() / ".venv" / "bin" / "agentvm-supervise")]
        launchers = [
            name
            for name in LAUNCHERS
            if (name != "supervisord" or bench.supervisord) and (name != "agentvm-before" or bench.baseline)
        ]
        if not bench.supervisord:
            _say("bench: supervisord is not installed, its rows are left out (./install.sh --test has it)")
        _say(core.PREFLIGHT_NOTE)
        try:
            sections_run(
                bench, results=results, args=args, sections=sections, launchers=launchers, problems=problems
            )
        except Failed as failed:
            return _failed(failed.problems)
        except RuntimeError as exc:  # a launcher that never started its runner, a scale run that hung
            return _failed([*problems, str(exc)])
    results.machine.load_after = list(os.getloadavg())
    results.ratios = _ratios(results)
    print(report(results, earlier))
    if args.quick:
        took = time.monotonic() - begun
        _say(f"\nbench --quick: every launcher started and left nothing behind ({took:.0f} s)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / f"bench-{stamp}.json"
    out.write_bytes(msgspec.json.format(msgspec.json.encode(results)))
    _say(f"\nwrote {out} ({time.monotonic() - begun:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
