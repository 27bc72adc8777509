"""Command line: argv in, exit code out.

Every failure the user can act on is a SupervisorError, printed as one paragraph with its named
exit code (errors.ExitCode); anything else is a bug, reported with ExitCode.INTERNAL and a
traceback under --debug.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio

from supervisor import __version__, attach, config, console, logs, plan, runtime
from supervisor.errors import ExitCode, SupervisorError
from supervisor.vm import Instance, Stdio
from supervisor.watchdog import Watchdog

PROG = "agentvm-supervise"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SupervisorError(f"{message}. Run '{self.prog} --help' for the flags and their values.")


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Run an AI coding agent in a throw-away microVM.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = commands.add_parser(
        "run",
        help="boot a VM with its shares and proxy its console",
        description="Boot the VM (the built-in guest unless the config names a kernel), with the "
        "project dir at /work, and proxy its console. With -- CMD ARGS..., run CMD in the built-in "
        "guest instead of a shell and exit with its status.",
    )
    run.add_argument("--config", type=Path, help="TOML config file (see docs/config.md)")
    run.add_argument("--work-dir", help="project dir mounted at /work (default: current dir)")
    run.add_argument("--agent-home", help="host dir mounted at /home/agent")
    run.add_argument("--runtime-dir", help="base dir for instance dirs (sockets, state)")
    run.add_argument("--name", help="instance name prefix (default: agentvm)")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="accelerator (default: auto)")
    run.add_argument("--machine", choices=["q35", "microvm"], help="QEMU machine type")
    run.add_argument("--mem", type=int, metavar="MIB", help="guest memory in MiB")
    run.add_argument("--vcpus", type=int, help="guest vCPUs")
    run.add_argument("--qemu", metavar="BINARY", help="QEMU binary")
    run.add_argument("--virtiofsd", metavar="BINARY", help="virtiofsd binary")
    run.add_argument("--socket-mode", choices=["fd", "path"], help="how virtiofsd gets its socket")
    run.add_argument("--escape-key", help="console escape key: ctrl-X, ^X, or none (default: ctrl-])")
    run.add_argument(
        "--no-console-filter",
        dest="console_filter",
        action="store_false",
        default=None,
        help="pass the guest's terminal sequences unfiltered (OSC 52, DCS, ...; see README)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log the whole lifecycle")
    run.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    run.add_argument("--log-format", choices=["human", "json"], help="default: human on a terminal")
    run.add_argument("guest_command", nargs=argparse.REMAINDER, help="-- CMD ARGS... to run in the guest")
    att = commands.add_parser(
        "attach",
        help="attach this terminal to a running VM's console",
        description="Attach this terminal to the console of a running VM (taking it over from the "
        "terminal that holds it). INSTANCE is the instance id or a unique prefix of it; with one running "
        "instance it may be left out.",
    )
    att.add_argument("instance", nargs="?", metavar="INSTANCE", help="instance id or unique prefix")
    att.add_argument("--config", type=Path, help="TOML config file (runtime-dir, console.escape-key)")
    att.add_argument("--runtime-dir", help="the base dir the instance was started with")
    att.add_argument("--escape-key", help="console escape key: ctrl-X, ^X, or none (default: ctrl-])")
    att.add_argument("--debug", action="store_true", help="debug logs and tracebacks")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    top = {
        "work-dir": args.work_dir,
        "agent-home": args.agent_home,
        "runtime-dir": args.runtime_dir,
        "name": args.name,
    }
    qemu = {
        "accel": args.accel,
        "machine": args.machine,
        "memory-mib": args.mem,
        "vcpus": args.vcpus,
        "binary": args.qemu,
    }
    virtiofsd = {"binary": args.virtiofsd, "socket-mode": args.socket_mode}
    console_section = {"escape-key": args.escape_key, "filter": getattr(args, "console_filter", None)}
    result: dict[str, Any] = {key: value for key, value in top.items() if value is not None}
    for section, values in (("qemu", qemu), ("virtiofsd", virtiofsd), ("console", console_section)):
        present = {key: value for key, value in values.items() if value is not None}
        if present:
            result[section] = present
    return result


def _run(args: argparse.Namespace) -> int:
    command = list(args.guest_command)
    if command and command[0] == "--":
        command = command[1:]
    elif command:
        raise SupervisorError(
            f"unexpected argument '{command[0]}': put the guest command after --, as in "
            f"'{PROG} run -- make test'"
        )
    cfg = config.load(args.config, _overrides(args))
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    checked = plan.build_plan(
        cfg,
        env=os.environ,
        cwd=Path.cwd(),
        command=command or None,
        terminal_size=console.get_window_size(stdin_fd),
    )
    # Forked before the event loop starts: fork is only safe while there are no threads.
    watchdog = Watchdog.start(tty_fd=stdin_fd if os.isatty(stdin_fd) else None)
    try:
        instance = Instance(checked, watchdog, Stdio(stdin_fd, stdout_fd))
        return anyio.run(instance.run)
    finally:
        watchdog.close()


def _attach(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.runtime_dir is not None:
        overrides["runtime-dir"] = args.runtime_dir
    if args.escape_key is not None:
        overrides["console"] = {"escape-key": args.escape_key}
    cfg = config.load(args.config, overrides)
    settings = plan.console_settings(cfg.console, os.environ)
    base = Path(cfg.runtime_dir) if cfg.runtime_dir else runtime.default_base(os.environ, os.geteuid())
    instance, path = attach.find_console(base, args.instance)
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    return anyio.run(
        lambda: attach.attach(instance, path, stdin=stdin_fd, stdout=stdout_fd, escape=settings.escape)
    )


def main(argv: Sequence[str] | None = None) -> int:
    debug = False
    try:
        args = _parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        if args.command is None:
            _parser().print_help(sys.stderr)
            return ExitCode.USAGE
        if args.command == "attach":
            logs.configure(level=logging.DEBUG if debug else None)
            return _attach(args)
        level = logging.DEBUG if debug else (logging.INFO if args.verbose else None)
        fmt = {"json": True, "human": False}.get(args.log_format or "")
        logs.configure(json=fmt, level=level)
        return _run(args)
    except SupervisorError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return ExitCode.SIGNAL_BASE + 2
    except Exception:
        if debug:
            traceback.print_exc()
        else:
            print(
                f"{PROG}: internal error (a bug): {sys.exc_info()[1]!r}. Run again with --debug for the "
                "traceback and report it.",
                file=sys.stderr,
            )
        return ExitCode.INTERNAL
