"""The agent guest: `run --agent FLAVOR -- FLAVOR --version` to the version line, from a built guest.

    python -m bench.agentguest [--agent claude] [--runs 3]

Builds the guest first if it is not built (that time is printed apart, not in the figures). The
figure is the time from exec of `agentvm-supervise run` to its exit after printing the version:
boot, the agent's first output, power-off and teardown (TCG on machines without usable KVM).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor import agentguest
from supervisor.config import Agent


def one_run(flavor: Agent, base: Path, index: int) -> float:
    work = base / f"run-{index}" / "work"
    work.mkdir(parents=True)
    argv = [
        sys.executable, "-m", "supervisor", "run", "--agent", flavor.value, "--name", "bench-agent",
        "--work-dir", str(work), "--agent-home", str(work.parent / "home"),
        "--runtime-dir", str(work.parent / "rt"), "--", flavor.value, "--version",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"bench: run failed ({result.returncode}): {result.stderr[-2000:]}")
    print(f"  run {index}: {elapsed:.1f} s: {result.stdout.strip()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.agentguest")
    parser.add_argument("--agent", default="claude", choices=[a.value for a in Agent])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    flavor = Agent(args.agent)
    if agentguest.find_built(os.environ, flavor) is None:
        started = time.monotonic()
        agentguest.ensure(os.environ, flavor)
        print(f"built the {flavor.value} guest in {time.monotonic() - started:.0f} s (not in the figures)")
    with tempfile.TemporaryDirectory(prefix="bench-agent-") as tmp:
        times = [one_run(flavor, Path(tmp), index) for index in range(args.runs)]
    print(
        f"{flavor.value}: run -> version -> exit: median {statistics.median(times):.1f} s, "
        f"min {min(times):.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
