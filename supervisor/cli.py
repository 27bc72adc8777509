"""Command line: argv in, exit code out.

Every failure the user can act on is a SupervisorError, printed as one paragraph with its named
exit code (errors.ExitCode); anything else is a bug, reported with ExitCode.INTERNAL and a
traceback under --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from supervisor import __version__, pid1
from supervisor.errors import ExitCode, SupervisorError

if TYPE_CHECKING:
    from supervisor import config, plan

# The verbs' modules are imported in the functions that use them: `run` pays for what it needs
# before the VM is up, and `--version` for nothing (python -X importtime; issue 17).

PROG = "agentvm-supervise"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SupervisorError(f"{message}. Run '{self.prog} --help' for the flags and their values.")


def _wait_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(
            f"invalid --wait-kvm timeout '{value}': give seconds > 0 (e.g. --wait-kvm=30), or no value "
            "to wait as long as it takes"
        )
    return seconds


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags laid over the config file: the same for `run` and `doctor`."""
    parser.add_argument(
        "--config",
        type=Path,
        help="TOML config file (docs/config.md; default: $XDG_CONFIG_HOME/agentvm-supervise/config.toml)",
    )
    parser.add_argument(
        "--agent",
        choices=["claude", "gemini", "codex"],
        help="agent flavor: names the agent home (claude); given here without --runner, it also "
        "boots that flavor's agent guest (--guest agent)",
    )
    parser.add_argument(
        "--guest",
        choices=["builtin", "agent"],
        help="what our own QEMU boots: the busybox guest (builtin), or the agent flavor's Debian guest",
    )
    parser.add_argument(
        "--work-dir", help="project dir mounted at /work (default: $WORK_DIR, else current dir)"
    )
    parser.add_argument(
        "--agent-home", help="host dir mounted at /home/agent (default: $AGENT_HOME, else derived)"
    )
    parser.add_argument(
        "--runner", metavar="SCRIPT", help="a microvm.nix runner (bin/microvm-run or its package dir) to run"
    )
    parser.add_argument(
        "--forward",
        action="append",
        metavar="[ADDR:]HOST:GUEST",
        help="forward a host port to a guest port (repeatable; ADDR defaults to 127.0.0.1)",
    )
    parser.add_argument(
        "--network",
        choices=["open", "allowlist", "none", "tap"],
        help="guest network: user-mode NAT, only the egress proxy (allow-list), no device, or a tap on "
        "network.bridge",
    )
    parser.add_argument(
        "--allow",
        action="append",
        metavar="RULE",
        help="also allow this host in allowlist mode: HOST, *.SUFFIX or ADDRESS, with an optional "
        ":PORT (repeatable; added to network.allow)",
    )
    parser.add_argument(
        "--deny",
        action="append",
        metavar="RULE",
        help="also deny this host in allowlist mode (repeatable; added to network.deny, deny wins)",
    )
    parser.add_argument("--runtime-dir", help="base dir for instance dirs (sockets, state)")
    parser.add_argument("--name", help="instance name prefix (default: <basename>-<agent>-vm)")
    parser.add_argument("--accel", choices=["auto", "kvm", "tcg"], help="accelerator (default: auto)")
    parser.add_argument("--kvm-device", metavar="PATH", help="the KVM node to check and wait for (/dev/kvm)")
    parser.add_argument("--machine", choices=["q35", "microvm"], help="QEMU machine type")
    parser.add_argument("--mem", type=int, metavar="MIB", help="guest memory in MiB")
    parser.add_argument("--vcpus", type=int, help="guest vCPUs")
    parser.add_argument("--qemu", metavar="BINARY", help="QEMU binary")
    parser.add_argument("--virtiofsd", metavar="BINARY", help="virtiofsd binary")
    parser.add_argument("--socket-mode", choices=["fd", "path"], help="how virtiofsd gets its socket")
    parser.add_argument(
        "--sandbox-fallback",
        action="store_const",
        const=True,
        help="where namespaces are unavailable, run virtiofsd without them (weaker isolation)",
    )


def _add_run_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="boot a VM with its shares and proxy its console",
        description="Boot the VM (the built-in guest unless the config names a kernel), with the "
        "project dir at /work, and proxy its console. With -- CMD ARGS..., run CMD in the built-in "
        "guest instead of a shell and exit with its status.",
    )
    _add_config_flags(run)
    run.add_argument(
        "--wait-kvm",
        nargs="?",
        const=math.inf,
        type=_wait_timeout,
        metavar="TIMEOUT",
        help="wait (up to TIMEOUT seconds; no value: no limit) for the KVM device to appear and be "
        "usable by this user, instead of failing or falling back to TCG",
    )
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
    run.add_argument(
        "--subreaper",
        action="store_true",
        help="adopt and reap orphaned descendants (automatic when running as PID 1)",
    )
    run.add_argument("guest_command", nargs=argparse.REMAINDER, help="-- CMD ARGS... to run in the guest")


def _parser() -> _Parser:
    from supervisor import guestcmd, manage

    parser = _Parser(prog=PROG, description="Run an AI coding agent in a throw-away microVM.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run_parser(commands)
    doctor_cmd = commands.add_parser(
        "doctor",
        help="check every precondition of a VM start, with remedies",
        description="Check every precondition of `run` with this configuration (the same checks run "
        "makes before it starts anything) and say how to fix what fails. Exits 0 only if a VM can "
        "start. Creates nothing.",
    )
    _add_config_flags(doctor_cmd)
    doctor_cmd.add_argument("--json", action="store_true", help="a JSON report instead of the table")
    doctor_cmd.add_argument("--debug", action="store_true", help="tracebacks of internal errors")
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
    manage.add_parsers(commands)
    guestcmd.add_parser(commands)
    allow_cmd = commands.add_parser(
        "allow",
        help="allow the host to evaluate this project's dev shell (DIRENV_ALLOW=1) as it is now",
        description="Record the project's Nix inputs (flake.nix, flake.lock, devenv files, every *.nix "
        "file) as reviewed: with DIRENV_ALLOW=1 the host evaluates the dev shell only while they are "
        "unchanged, since the guest can edit them. Review them first.",
    )
    allow_cmd.add_argument("--work-dir", help="the project dir (default: $WORK_DIR, else the current dir)")
    commands.add_parser(
        "schema",
        help="print the JSON Schema of every --json output and of the control protocol",
        description="Print one JSON Schema document (2020-12) describing status/list/stop/doctor "
        "--json and the control socket's messages (docs/schema.json is this output).",
    )
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="Print a completion script generated from this CLI's flags, e.g. "
        f"'{PROG} completion bash > ~/.local/share/bash-completion/completions/{PROG}'.",
    )
    completion.add_argument("shell", choices=["bash"], help="the shell")
    return parser


def _config_file(args: argparse.Namespace) -> Path | None:
    """--config FILE, else $XDG_CONFIG_HOME/agentvm-supervise/config.toml if it exists (not both:
    a file given is the whole configuration, so a unit's config is not changed by the user's)."""
    from supervisor import xdg

    given: Path | None = args.config
    return given if given is not None else xdg.default_config(os.environ)


def _print_meta(args: argparse.Namespace) -> int:
    if args.command == "schema":
        from supervisor import outputs

        sys.stdout.write(outputs.render(outputs.schema()))
    else:
        from supervisor import completion

        sys.stdout.write(completion.bash(_parser()))
    return ExitCode.OK


def _allow(args: argparse.Namespace) -> int:
    from supervisor import config, devallow

    raw = args.work_dir or os.environ.get("WORK_DIR") or str(Path.cwd())
    config.check_environment_paths(os.environ, raw)
    work_dir = Path(raw).expanduser().resolve()
    if not work_dir.is_dir():
        raise SupervisorError(
            f"the work dir {work_dir} is not a directory: pass the project dir with --work-dir"
        )
    allowed = devallow.allow(work_dir, os.environ)
    names = ", ".join(allowed) or "no Nix files"
    print(f"allowed the dev shell of {work_dir} as it is now ({names})")
    return ExitCode.OK


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    top = {
        "agent": args.agent,
        "forwards": args.forward,
        "work-dir": args.work_dir,
        "agent-home": args.agent_home,
        "runtime-dir": args.runtime_dir,
        "name": args.name,
    }
    qemu = {
        "accel": args.accel,
        "kvm-device": args.kvm_device,
        "machine": args.machine,
        "memory-mib": args.mem,
        "vcpus": args.vcpus,
        "binary": args.qemu,
    }
    virtiofsd = {
        "binary": args.virtiofsd,
        "socket-mode": args.socket_mode,
        "sandbox-fallback": args.sandbox_fallback,
    }
    result: dict[str, Any] = {key: value for key, value in top.items() if value is not None}
    # `run --agent claude` means claude's agent guest (unless a runner is given: it names the home)
    guest_kind = args.guest or ("agent" if args.agent and not args.runner else None)
    if guest_kind is not None:
        result["guest"] = guest_kind
    runner = {"script": args.runner}
    console_section = {
        "escape-key": getattr(args, "escape_key", None),
        "filter": getattr(args, "console_filter", None),
    }
    network = {"mode": getattr(args, "network", None)}
    sections = (
        ("qemu", qemu),
        ("virtiofsd", virtiofsd),
        ("runner", runner),
        ("console", console_section),
        ("network", network),
    )
    for section, values in sections:
        present = {key: value for key, value in values.items() if value is not None}
        if present:
            result[section] = present
    return result


def _check_paths(cfg: config.Config) -> None:
    """Paths from the environment (and the current dir, when it is the work dir) we pass on."""
    from supervisor import config

    cwd = None
    if not cfg.work_dir and not os.environ.get("WORK_DIR"):
        with contextlib.suppress(OSError):
            cwd = str(Path.cwd())
    config.check_environment_paths(os.environ, cwd)


def _load_config(args: argparse.Namespace) -> config.Config:
    import msgspec

    from supervisor import config

    cfg = config.load(_config_file(args), _overrides(args))
    if args.allow or args.deny:  # added to the file's rules, where a list flag would replace them
        network = msgspec.structs.replace(
            cfg.network,
            allow=[*cfg.network.allow, *(args.allow or [])],
            deny=[*cfg.network.deny, *(args.deny or [])],
        )
        cfg = msgspec.structs.replace(cfg, network=network)
    if args.guest is None and (cfg.runner is not None or cfg.qemu.kernel is not None):
        # --agent only implied the agent guest: a config's runner or kernel keeps its own guest
        cfg = msgspec.structs.replace(cfg, guest=config.GuestKind.BUILTIN)
    return cfg


def _doctor(args: argparse.Namespace) -> int:
    from supervisor import doctor

    cfg = _load_config(args)
    _check_paths(cfg)
    report = doctor.diagnose(cfg, env=os.environ, cwd=Path.cwd())
    if args.json:
        sys.stdout.buffer.write(doctor.render_json(report))
    else:
        sys.stdout.write(doctor.render_table(report))
    sys.stdout.flush()
    return report.exit_code


def _wait_for_kvm(cfg: config.Config, timeout: float) -> None:
    import functools

    import anyio

    from supervisor import kvm_watch
    from supervisor.config import Accel

    if cfg.qemu.accel is Accel.TCG:
        return  # nothing to wait for
    device = Path(cfg.qemu.kvm_device).expanduser()
    anyio.run(functools.partial(kvm_watch.wait_for_device, device, timeout=timeout))


def _log_warnings(checked: plan.Plan) -> None:
    import structlog

    from supervisor.checks import Status

    log = structlog.get_logger()
    for check in checked.checks:
        if check.status is Status.WARN:
            log.warning(check.summary, check=check.name, remedy=check.remedy)


def _run(args: argparse.Namespace, stop_signals: pid1.StopSignals) -> int:
    import anyio

    from supervisor import launcher, logs, plan
    from supervisor.console.terminal import get_window_size
    from supervisor.notify import Notifier, extending
    from supervisor.vm import Host, Instance, Stdio
    from supervisor.watchdog import Watchdog

    command = list(args.guest_command)
    if command and command[0] == "--":
        command = command[1:]
    elif command:
        raise SupervisorError(
            f"unexpected argument '{command[0]}': put the guest command after --, as in "
            f"'{PROG} run -- make test'"
        )
    # /proc/PID/environ of the supervisor itself would show the API key otherwise (children, the
    # watchdog included, get an environment without it).
    launcher.scrub_proc_environ()
    cfg = _load_config(args)
    _check_paths(cfg)
    notifier = Notifier.from_env(os.environ)
    try:
        if args.wait_kvm is not None:
            with extending(notifier, "waiting for the KVM device"):
                _wait_for_kvm(cfg, args.wait_kvm)
        stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
        with extending(notifier, "checking the host (and building the guest the first time)"):
            checked = plan.build_plan(
                cfg,
                env=os.environ,
                cwd=Path.cwd(),
                command=command or None,
                terminal_size=get_window_size(stdin_fd),
            )
        logs.bind_instance(checked.instance)
        _log_warnings(checked)
        host = Host(subreaper=args.subreaper, notifier=notifier, stop_signals=stop_signals)
        # From here on a stop signal is handled by the instance (graceful stop), not by unwinding.
        stop_signals.defer()
        # Forked before the event loop starts: fork is only safe while there are no threads.
        watchdog = Watchdog.start(tty_fd=stdin_fd if os.isatty(stdin_fd) else None)
        try:
            instance = Instance(checked, watchdog, Stdio(stdin_fd, stdout_fd), host)
            return anyio.run(instance.run)
        finally:
            stop_signals.defer()  # the loop left SIG_DFL behind, which PID 1 would silently ignore
            watchdog.close()
    finally:
        notifier.close()


def _attach(args: argparse.Namespace) -> int:
    import anyio

    from supervisor import config, plan, runtime
    from supervisor.console import attach

    overrides: dict[str, Any] = {}
    if args.runtime_dir is not None:
        overrides["runtime-dir"] = args.runtime_dir
    if args.escape_key is not None:
        overrides["console"] = {"escape-key": args.escape_key}
    cfg = config.load(_config_file(args), overrides)
    config.check_environment_paths(os.environ)
    settings = plan.console_settings(cfg.console, os.environ)
    base = Path(cfg.runtime_dir) if cfg.runtime_dir else runtime.default_base(os.environ, os.geteuid())
    instance, path = attach.find_console(base, args.instance)
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    return anyio.run(
        lambda: attach.attach(instance, path, stdin=stdin_fd, stdout=stdout_fd, escape=settings.escape)
    )


def entry(*, unblock: Iterable[int] = ()) -> NoReturn:
    """The console script: `main`, then straight out once the output is flushed.

    Everything the supervisor started is cleaned up by then (teardown is the nesting of its task
    groups), so the interpreter's own finalization (every module and object torn down, tens of
    ms: issue 17) would only delay the exit status the caller is waiting for."""
    try:
        code: int | str | None = main(unblock=unblock)
    except SystemExit as exc:  # argparse: --help, and its own exits
        code = exc.code
    if not isinstance(code, int):
        raise SystemExit(code)
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _prepare_decoders() -> None:
    """msgspec builds a type's decoding info on its first decode, calling back into Python. A stop
    signal whose handler raises there (pid1.StopSignals, before the event loop) makes msgspec 0.23
    dereference NULL in typenode_collect_type: SIGSEGV, seen as a rare -11 in the fault suite and
    reproduced by raising from SIGALRM during a first config.load. So the types the start decodes
    get their info here, while the entry point still holds the stop signals; it is cached on them."""
    import msgspec

    from supervisor import config, facts, runtime

    for kind in (config.Config, runtime.InstanceState, *facts.DECODED_TYPES):
        msgspec.json.Decoder(kind)


def main(argv: Sequence[str] | None = None, *, unblock: Iterable[int] = ()) -> int:
    """`unblock`: stop signals the entry point held back while importing us (supervisor/entry.py)."""
    debug = False
    # First of all: as PID 1, a signal without a handler is dropped by the kernel (see pid1.py).
    stop_signals = pid1.StopSignals().install()
    try:
        if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
            # Before the parser: building it imports the verbs' modules (manage.add_parsers).
            print(f"{PROG} {__version__}")
            return 0
        if unblock:
            _prepare_decoders()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, unblock)  # one that came meanwhile lands here
        args = _parser().parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        import logging

        from supervisor import logs

        if args.command is None:
            _parser().print_help(sys.stderr)
            return ExitCode.USAGE
        if args.command in ("schema", "completion"):
            return _print_meta(args)
        if args.command == "attach":
            logs.configure(level=logging.DEBUG if debug else None)
            return _attach(args)
        if args.command == "doctor":
            logs.configure(level=logging.WARNING)  # stdout is the report's alone
            return _doctor(args)
        level = logging.DEBUG if debug else (logging.INFO if getattr(args, "verbose", False) else None)
        fmt = {"json": True, "human": False}.get(getattr(args, "log_format", None) or "")
        logs.configure(json=fmt, level=level)
        if args.command == "allow":
            return _allow(args)
        if args.command == "guest":
            from supervisor import guestcmd

            return guestcmd.run(args)
        if args.command != "run":
            from supervisor import config, manage

            config.check_environment_paths(os.environ)
            return manage.run_verb(args)
        return _run(args, stop_signals)
    except SupervisorError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    except pid1.StopRequested as stop:
        print(
            f"{PROG}: stopped by {signal.Signals(stop.signum).name} while starting, before any VM "
            "process existed; nothing was left behind.",
            file=sys.stderr,
        )
        return ExitCode.SIGNAL_BASE + stop.signum
    except KeyboardInterrupt:
        return ExitCode.SIGNAL_BASE + 2
    except Exception:
        if debug:
            import traceback

            traceback.print_exc()
        else:
            print(
                f"{PROG}: internal error (a bug): {sys.exc_info()[1]!r}. Run again with --debug for the "
                "traceback and report it.",
                file=sys.stderr,
            )
        return ExitCode.INTERNAL
