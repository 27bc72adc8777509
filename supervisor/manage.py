"""The `status`, `stop` and `list` verbs: find this user's instances and talk to their control sockets.

Instances are found through the runtime dirs (BASE/INSTANCE/state.json, see runtime.py). An instance
whose supervisor is gone is stale: `list` reports it and cleans it up (runtime.clean_stale); the
other verbs only point at it.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from supervisor import control, outputs, runtime, trust
from supervisor.errors import ExitCode, SupervisorError

PROG = runtime.PROG
QUERY_TIMEOUT = 5.0
LIST_QUERY_TIMEOUT = 2.0


def add_parsers(commands: Any) -> None:
    """Add the verbs to the CLI's subparsers."""
    status = commands.add_parser(
        "status",
        help="show a running instance: children, shares, accelerator, console",
        description="Ask a running instance's supervisor for its state, through its control socket.",
    )
    status.add_argument("instance", nargs="?", help="instance id or a unique prefix (default: the only one)")
    status.add_argument("--json", action="store_true", help="print the reply as JSON")
    status.add_argument("--runtime-dir", help="base dir of the instance dirs, as given to run")
    stop = commands.add_parser(
        "stop",
        help="stop a running instance gracefully and wait for it to end",
        description="Take the instance's graceful stop path (guest power-off, a deadline, QMP quit, "
        "then SIGTERM/SIGKILL) and wait until its supervisor has exited. The instance's own exit "
        "status is then 143, as after SIGTERM.",
    )
    stop.add_argument("instance", nargs="?", help="instance id or a unique prefix (default: the only one)")
    stop.add_argument(
        "--deadline",
        type=float,
        metavar="S",
        help="seconds the guest has to power off (default: the instance's timeouts.graceful-stop)",
    )
    stop.add_argument("--timeout", type=float, default=60.0, metavar="S", help="give up waiting after S s")
    stop.add_argument("--no-wait", action="store_true", help="return once the stop has begun")
    stop.add_argument("--runtime-dir", help="base dir of the instance dirs, as given to run")
    stop.add_argument("--json", action="store_true", help="print the result as JSON (outputs.StopResult)")
    listing = commands.add_parser(
        "list",
        help="list this user's live instances; clean up after dead ones",
        description="List the live instances under the runtime dir. Instances whose supervisor died "
        "without cleaning up are reported and cleaned up (leftover processes killed, dirs removed).",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--runtime-dir", help="base dir of the instance dirs, as given to run")


def run_verb(args: argparse.Namespace) -> int:
    base = _base(args.runtime_dir)
    trust.check_base(base)
    if args.command == "list":
        return _list(base, as_json=args.json)
    found = runtime.find_instance(base, args.instance, verb=args.command)
    if args.command == "status":
        status = _query(found, control.StatusRequest())
        if args.json:
            sys.stdout.write(outputs.render(status))
        else:
            print(format_status(status))
        return ExitCode.OK
    if args.deadline is not None and not 0 < args.deadline <= 3600:
        raise SupervisorError(f"--deadline {args.deadline:g} is out of range: give seconds in (0, 3600]")
    status = _query(found, control.StopRequest(deadline=args.deadline))
    if args.no_wait:
        if args.json:
            sys.stdout.write(
                outputs.render(outputs.StopResult(instance=status.instance, stopped=False, status=status))
            )
        return ExitCode.OK
    if not wait_exit(found, timeout=args.timeout):
        raise SupervisorError(
            f"instance {found.state.instance} (supervisor pid {found.state.supervisor_pid}) is still "
            f"stopping after {args.timeout:g} s; wait longer with --timeout, or send its supervisor "
            "SIGTERM twice to skip the graceful path",
            exit_code=ExitCode.UNAVAILABLE,
        )
    if args.json:
        sys.stdout.write(
            outputs.render(outputs.StopResult(instance=status.instance, stopped=True, status=status))
        )
    else:
        print(f"stopped {found.state.instance}")
    return ExitCode.OK


def _base(runtime_dir: str | None) -> Path:
    base = Path(runtime_dir) if runtime_dir else runtime.default_base(os.environ, os.geteuid())
    if not base.is_absolute():
        raise SupervisorError(f"--runtime-dir '{base}' is relative: give an absolute path")
    return base


def _query(
    found: runtime.Found, request: control.Request, timeout: float = QUERY_TIMEOUT
) -> control.InstanceStatus:
    try:
        return control.call(found.control_socket, request, timeout=timeout)
    except control.ControlError as exc:
        raise SupervisorError(
            f"instance {found.state.instance} (supervisor pid {found.state.supervisor_pid}) did not "
            f"answer on {found.control_socket}: {exc}. It may be just starting or ending; try again, or "
            f"stop its supervisor with SIGTERM.",
            exit_code=ExitCode.UNAVAILABLE,
        ) from None


def wait_exit(found: runtime.Found, *, timeout: float) -> bool:
    """Wait until the instance's supervisor has exited; False on timeout."""
    state = found.state
    if not runtime.in_our_pid_namespace(state):
        # Its pid means nothing here (a container's instance): its dir goes when it is done.
        deadline = time.monotonic() + timeout
        while found.path.exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True
    try:
        pidfd = os.pidfd_open(state.supervisor_pid)
    except ProcessLookupError:
        return True
    try:
        # The pid may have been recycled between reading state.json and pidfd_open.
        if not runtime.process_alive(state.supervisor_pid, state.supervisor_start_ticks):
            return True
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def _list(base: Path, *, as_json: bool) -> int:
    cleaned = runtime.clean_stale(base)
    for instance in cleaned:
        print(f"{PROG}: cleaned up {instance}: its supervisor had died", file=sys.stderr)
    live, _ = runtime.scan(base)
    rows = []
    for found in live:
        try:
            phase: str = control.call(
                found.control_socket, control.StatusRequest(), timeout=LIST_QUERY_TIMEOUT
            ).phase
        except control.ControlError:
            phase = "unknown"  # starting (no socket yet), ending, or not answering
        rows.append((found, phase))
    if as_json:
        listed = [
            outputs.ListedInstance(
                instance=found.state.instance,
                phase=phase,  # type: ignore[arg-type]  # a Phase from the socket, or "unknown"
                supervisor_pid=found.state.supervisor_pid,
                created=found.state.created,
                work_dir=found.state.work_dir,
                runtime_dir=str(found.path),
            )
            for found, phase in rows
        ]
        sys.stdout.write(outputs.render(outputs.InstanceList(instances=listed, stale_cleaned=cleaned)))
        return ExitCode.OK
    if not rows:
        print(f"no instances are running under {base}", file=sys.stderr)
        return ExitCode.OK
    table = [("INSTANCE", "PID", "PHASE", "UP", "WORK DIR")]
    now = time.time()
    for found, phase in rows:
        state = found.state
        table.append(
            (
                state.instance,
                str(state.supervisor_pid),
                phase,
                _duration(now - state.created),
                state.work_dir or "-",
            )
        )
    widths = [max(len(row[column]) for row in table) for column in range(4)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)), row[4])
    return ExitCode.OK


def format_status(status: control.InstanceStatus) -> str:
    now = time.time()
    guest = (
        f"{status.guest}, {status.accelerator}, {status.machine}, {status.memory_mib} MiB, "
        f"{status.vcpus} vCPU"
    )
    lines = [
        f"instance  {status.instance}: {status.phase}, supervisor pid {status.supervisor_pid}, "
        f"up {_duration(now - status.started)}",
        f"guest     {guest}",
        f"          accelerator: {status.accelerator_reason}" if status.accelerator_reason else "",
        f"command   {shlex.join(status.command)}" if status.command else "command   (interactive shell)",
        f"work dir  {status.work_dir or '-'}",
        f"runtime   {status.runtime_dir}",
        f"console   {'attached' if status.console_attached else 'not attached'}",
        f"stopping  {status.stop_cause}" if status.stop_cause else "",
        "children",
    ]
    for child in status.children:
        state = (
            f"running, up {_duration(now - child.started)}"
            if child.state == "running"
            else f"exited ({child.exit_detail})"
        )
        lines.append(f"  {child.name:<24} pid {child.pid:<8} {state}")
    lines.append("shares")
    for share in status.shares:
        mode = "ro" if share.read_only else "rw"
        lines.append(f"  {share.tag:<16} {share.source} -> {share.guest_path} ({mode})")
    egress = status.egress
    if egress is not None:  # allowlist mode (supervisor/egress)
        lines.append(
            f"egress    allowlist via {egress.proxy}: {egress.allowed} allowed, {egress.denied} denied, "
            f"{egress.errors} failed, {egress.active} open; log {egress.log}"
        )
        if egress.top_denied:
            lines.append(f"          most denied: {', '.join(egress.top_denied)}")
    return "\n".join(line for line in lines if line)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
