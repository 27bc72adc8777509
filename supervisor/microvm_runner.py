"""microvm.nix runners: run any VM's `bin/microvm-run` as the VM process (the runner script).

microvm.nix writes a shell script that ends in `exec [-a microvm@HOST] HYPERVISOR ARGS... ${runtime_args:-}`.
Its sockets are relative by default (`<hostName>.sock` for QMP or cloud-hypervisor's API,
`<hostName>-virtiofs-<tag>.sock` for each virtiofs share), so they land in the caller's cwd and two
instances clobber each other's; its QEMU command has `-enable-kvm` after `accel=kvm:tcg` and
`-cpu host`, which rule out the TCG fallback. This module parses that exec line into words (keeping
each word's exact text), rewrites only the words it must (each found by the option before it, or as
an exact field of one), and renders a copy of the script into the instance's runtime dir:

- virtiofs sockets -> RUNTIME/<tag>.sock, bound by the supervisor, served by virtiofsd it starts;
- QEMU: `-qmp unix:...` -> RUNTIME/qmp.sock, plus a private QMP channel on a passed fd (the graceful
  stop); `-name` and `exec -a` -> the instance name; under TCG `accel=tcg`, no `-enable-kvm`,
  `-cpu max`; --mem/--vcpus/--forward applied to `-m`/memfd size, `-smp`, the user netdev;
- cloud-hypervisor: `--api-socket` (and the `rm -f` before it) -> RUNTIME/api.sock, which the
  graceful stop uses (`vm.power-button`); `--fs socket=`; --mem/--vcpus to `--memory`/`--cpus`.

Anything unexpected (no exec line, a second -qmp, a memory form it cannot change) is an error that
names the runner and the word, never a guess.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.config import Accel, Hypervisor
from supervisor.errors import ExitCode, SupervisorError
from supervisor.launcher import Forward
from supervisor.qemu import qemu_escape
from supervisor.runtime import InstanceDir

SCRIPT_NAME = "microvm-run"
PRIVATE_QMP_ID = "agentvm-qmp"

# QEMU options that take no argument; every other option takes exactly one.
QEMU_FLAGS = frozenset(
    [
        "-enable-kvm", "-nodefaults", "-no-user-config", "-no-reboot", "-no-shutdown", "-nographic",
        "-S", "-s", "-snapshot", "-no-hpet", "-no-acpi", "-full-screen", "-no-quit", "-daemonize",
        "-only-migratable", "-enable-sync-profile",
    ]
)  # fmt: skip


def _error(script: Path, what: str) -> SupervisorError:
    return SupervisorError(
        f"the runner {script} {what}. agentvm-supervise runs runners as microvm.nix generates them "
        "(bin/microvm-run of a qemu or cloud-hypervisor VM); point runner.script / --runner at one",
    )


# ---- shell words -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Word:
    raw: str  # exactly as in the script
    value: str | None  # after quote removal; None when the shell would expand it ($x, `x`)


def split_words(line: str) -> list[Word]:
    """Split one simple command into words, keeping each word's raw text.

    Handles '...', "..." and backslashes; a word with an unquoted or double-quoted $ or backquote is
    kept but has no value. Operators (; & | < > ( )) are refused: the exec line is a plain command.
    """
    words: list[Word] = []
    i, n = 0, len(line)
    while i < n:
        if line[i] in " \t":
            i += 1
            continue
        if line[i] == "#":
            break
        start, value, expands = i, [], False
        while i < n and line[i] not in " \t":
            char = line[i]
            if char == "'":
                end = line.find("'", i + 1)
                if end < 0:
                    raise ValueError("an unterminated '")
                value.append(line[i + 1 : end])
                i = end + 1
            elif char == '"':
                i += 1
                while i < n and line[i] != '"':
                    if line[i] == "\\" and i + 1 < n and line[i + 1] in '$`"\\':
                        value.append(line[i + 1])
                        i += 2
                        continue
                    if line[i] in "$`":
                        expands = True
                    value.append(line[i])
                    i += 1
                if i >= n:
                    raise ValueError('an unterminated "')
                i += 1
            elif char == "\\":
                if i + 1 >= n:
                    raise ValueError("a trailing backslash")
                value.append(line[i + 1])
                i += 2
            elif char in ";&|<>()":
                raise ValueError(f"the shell operator {char!r}")
            else:
                if char in "$`":
                    expands = True
                value.append(char)
                i += 1
        words.append(Word(line[start:i], None if expands else "".join(value)))
    return words


def _quote(value: str) -> str:
    return shlex.quote(value)


def _options(value: str) -> list[tuple[str, str | None]]:
    """'a,b=c' -> [("a", None), ("b", "c")] (QEMU/cloud-hypervisor option lists); ',,' is QEMU's
    escape for a comma inside a value (a path), kept as one ',' in the value."""
    result: list[tuple[str, str | None]] = []
    for item in value.replace(",,", "\0").split(","):
        key, sep, val = item.replace("\0", ",").partition("=")
        result.append((key, val if sep else None))
    return result


def _join_options(items: Sequence[tuple[str, str | None]]) -> str:
    return ",".join(key if val is None else f"{key}={qemu_escape(val)}" for key, val in items)


def _set_option(value: str, key: str, new: str) -> str:
    return _join_options([(k, new if k == key else v) for k, v in _options(value)])


def _get_option(value: str, key: str) -> str | None:
    for k, v in _options(value):
        if k == key:
            return v
    return None


# ---- the script --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerScript:
    path: Path  # bin/microvm-run as given (not resolved: its dir is the runner package)
    lines: tuple[str, ...]
    exec_line: int  # index into lines
    words: tuple[Word, ...]  # of the exec line
    interpreter: tuple[str, ...]  # from the #! line

    @property
    def runner_dir(self) -> Path | None:
        return self.path.parent.parent if self.path.parent.name == "bin" else None

    @property
    def program_index(self) -> int:
        """Index of the hypervisor binary in `words` (after `exec` and an optional `-a NAME`)."""
        return 3 if len(self.words) > 2 and self.words[1].value == "-a" else 1

    @property
    def program(self) -> str:
        word = self.words[self.program_index]
        return word.value or word.raw


def read_script(raw: str, cwd: Path) -> RunnerScript:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = cwd / path
    if path.is_dir():
        path = path / "bin" / SCRIPT_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SupervisorError(
            f"the runner {path} does not exist: point runner.script / --runner at a microvm.nix runner's "
            "bin/microvm-run (e.g. the result of `nix build .#nixosConfigurations.NAME.config.microvm"
            ".declaredRunner`)",
            exit_code=ExitCode.NO_INPUT,
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not a text file"
        raise SupervisorError(
            f"the runner {path} cannot be read ({reason}): point runner.script / --runner at a "
            "microvm.nix runner's bin/microvm-run",
            exit_code=ExitCode.NO_INPUT,
        ) from None
    lines = text.split("\n")
    if not lines[0].startswith("#!"):
        raise _error(path, "has no #! line naming its shell")
    interpreter = lines[0][2:].strip().split(None, 1)
    if not interpreter or not Path(interpreter[0]).is_file():
        raise SupervisorError(
            f"the runner {path} names the shell {lines[0][2:].strip()!r} in its #! line, which does not "
            "exist on this host: build the runner for this host (its Nix store must be here)",
            exit_code=ExitCode.UNAVAILABLE,
        )
    found: list[tuple[int, list[Word]]] = []
    for index, line in enumerate(lines[1:], start=1):
        if line.lstrip().startswith("exec ") or line.strip() == "exec":
            try:
                found.append((index, split_words(line)))
            except ValueError as exc:
                raise _error(path, f"has an exec line (line {index + 1}) with {exc}") from None
    if len(found) != 1:
        raise _error(path, f"has {len(found)} exec lines where microvm.nix writes exactly one")
    index, words = found[0]
    script = RunnerScript(path, tuple(lines), index, tuple(words), tuple(interpreter))
    if len(words) <= script.program_index:
        raise _error(path, f"has an exec line (line {index + 1}) without a program")
    return script


def detect_hypervisor(script: RunnerScript, configured: Hypervisor) -> Hypervisor:
    if configured is not Hypervisor.AUTO:
        return configured
    declared = None
    if script.runner_dir is not None:
        try:
            declared = (script.runner_dir / "share" / "microvm" / "hypervisor").read_text().strip()
        except OSError:
            declared = None
    name = declared or Path(script.program).name
    if name == "qemu" or name.startswith("qemu-system-"):
        return Hypervisor.QEMU
    if name == "cloud-hypervisor":
        return Hypervisor.CLOUD_HYPERVISOR
    raise SupervisorError(
        f"the runner {script.path} runs {name!r}; agentvm-supervise runs qemu and cloud-hypervisor "
        'runners: build the VM with microvm.hypervisor = "qemu" (or "cloud-hypervisor")',
        exit_code=ExitCode.UNAVAILABLE,
    )


def declared_sources(script: RunnerScript) -> dict[str, str]:
    """tag -> source of the runner's virtiofs shares, from share/microvm/virtiofs/TAG/source."""
    result: dict[str, str] = {}
    if script.runner_dir is None:
        return result
    base = script.runner_dir / "share" / "microvm" / "virtiofs"
    try:
        tags = sorted(entry.name for entry in base.iterdir())
    except OSError:
        return result
    for tag in tags:
        try:
            result[tag] = (base / tag / "source").read_text().strip()
        except OSError:
            continue
    return result


# ---- the rewrite -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Overrides:
    instance: str
    accel: Accel
    cpu: str | None  # qemu.cpu from the config: replaces -cpu
    memory_mib: int | None
    vcpus: int | None
    forwards: list[Forward] = field(default_factory=list)
    cmdline: str = ""  # qemu.cmdline from the config: appended to -append
    tsc_khz: int | None = None  # the host's TSC rate: what a TCG guest's TSC runs at
    # egress allowlist (egress.NetworkPlan.netdev_extra): appended to the user netdev, which must be
    # the runner's only network; () leaves the network as it is
    netdev_extra: tuple[str, ...] = ()


@dataclass
class _Edit:
    """The exec line as raw words, edited in place; values looked up from the parsed words."""

    script: RunnerScript
    raw: list[str] = field(default_factory=list)
    values: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.raw = [word.raw for word in self.script.words]
        self.values = [word.value for word in self.script.words]

    def value(self, index: int, option: str) -> str:
        if index >= len(self.values) or self.values[index] is None:
            raise _error(self.script.path, f"has {option} without a literal value after it")
        value = self.values[index]
        assert value is not None
        return value

    def set(self, index: int, value: str) -> None:
        self.raw[index] = _quote(value)
        self.values[index] = value

    def tail_index(self) -> int:
        """Where appended words go: before the trailing expansions (`${runtime_args:-}`)."""
        end = len(self.values)
        while end > self.script.program_index + 1 and self.values[end - 1] is None:
            end -= 1
        return end


@dataclass(frozen=True)
class RunnerTap:
    """A tap interface the runner opens by name (microvm.interfaces type "tap"): it must exist first."""

    name: str
    multi_queue: bool  # QEMU queues=N>1, cloud-hypervisor num_queues>2: the tap needs IFF_MULTI_QUEUE


UNSUPPORTED_NIC = (
    "; agentvm-supervise creates tap interfaces the runner opens by name (microvm.interfaces "
    'type "tap", -netdev tap,ifname=... / --net tap=...) on [network] bridge; macvtap, fd-passed '
    "taps and QEMU's bridge helper are not supported: use a tap interface, or start the VM with "
    "microvm.nix's own host units"
)


def _qemu_tap(script: Path, value: str) -> RunnerTap | None:
    kind = value.split(",", maxsplit=1)[0]
    if kind == "bridge" or (kind == "tap" and _get_option(value, "helper") is not None):
        raise _error(script, f"has -netdev {value!r}, which needs QEMU's bridge helper{UNSUPPORTED_NIC}")
    if kind != "tap":
        return None
    if _get_option(value, "fd") is not None or _get_option(value, "fds") is not None:
        raise _error(script, f"has -netdev {value!r}, a tap passed as an fd (macvtap){UNSUPPORTED_NIC}")
    name = _get_option(value, "ifname")
    if name is None:
        raise _error(script, f"has -netdev {value!r} without ifname={UNSUPPORTED_NIC}")
    queues = _get_option(value, "queues") or "1"
    return RunnerTap(name, queues.isdigit() and int(queues) > 1)


def _ch_tap(script: Path, value: str) -> RunnerTap | None:
    if _get_option(value, "fd") is not None:
        raise _error(script, f"has --net {value!r}, a tap passed as an fd (macvtap){UNSUPPORTED_NIC}")
    name = _get_option(value, "tap")
    if name is None:
        return None
    queues = _get_option(value, "num_queues") or "2"
    return RunnerTap(name, queues.isdigit() and int(queues) > 2)


@dataclass(frozen=True)
class RunnerPlan:
    script: RunnerScript
    hypervisor: Hypervisor
    share_tags: tuple[str, ...]  # virtiofs tags, in the order the hypervisor names them
    cwd: Path | None  # None: the instance dir
    raw_words: tuple[str, ...]  # the rewritten exec line, with {qmp_fd} not yet filled in
    rm_line: int | None  # cloud-hypervisor: the `rm -f SOCKET` line to point at the new socket
    qmp_fd_word: int | None  # index of the word holding the private QMP fd (QEMU)
    notes: tuple[str, ...] = ()  # warnings for the log
    taps: tuple[RunnerTap, ...] = ()  # created by the supervisor before the runner starts

    def render(self, instance_dir: Path, private_qmp_fd: int | None) -> str:
        words = list(self.raw_words)
        if self.qmp_fd_word is not None:
            if private_qmp_fd is None:
                raise ValueError("a QEMU runner needs its private QMP fd")
            words[self.qmp_fd_word] = _quote(f"socket,id={PRIVATE_QMP_ID},fd={private_qmp_fd}")
        lines = list(self.script.lines)
        line = lines[self.script.exec_line]
        lines[self.script.exec_line] = line[: len(line) - len(line.lstrip())] + " ".join(words)
        if self.rm_line is not None:
            lines[self.rm_line] = "rm -f " + _quote(str(InstanceDir(instance_dir).api_socket))
        return "\n".join(lines)

    def argv(self, rendered_path: Path) -> list[str]:
        return [*self.script.interpreter, str(rendered_path)]

    def write(self, instance_dir: Path, private_qmp_fd: int | None) -> Path:
        """The rewritten copy, in the instance dir (read and run by its owner only)."""
        script = InstanceDir(instance_dir).runner_script
        script.write_text(self.render(instance_dir, private_qmp_fd))
        script.chmod(0o500)
        return script


def _rewrite_argv0(edit: _Edit, instance: str) -> None:
    if edit.script.program_index == 3:
        edit.set(2, f"microvm@{instance}")


def plan_qemu(script: RunnerScript, instance_dir: Path, overrides: Overrides) -> RunnerPlan:
    edit = _Edit(script)
    _rewrite_argv0(edit, overrides.instance)
    tcg = overrides.accel is Accel.TCG
    positions, fs_chardevs, drop = _scan_qemu_options(edit, tcg=tcg)
    notes = _rewrite_qemu_machine(edit, positions, overrides, tcg=tcg)
    _rewrite_qemu_resources(edit, positions, overrides)
    _rewrite_qemu_sockets(edit, positions, fs_chardevs, InstanceDir(instance_dir))
    if overrides.forwards:
        _add_qemu_forwards(edit, positions, overrides.forwards)
    if overrides.netdev_extra:
        _restrict_network(edit, positions, overrides.netdev_extra)
    taps = [
        tap for i in positions.get("-netdev", []) if (tap := _qemu_tap(script.path, edit.value(i, "-netdev")))
    ]
    tail = edit.tail_index()
    extra = [_quote("-chardev"), "", _quote("-mon"), _quote(f"chardev={PRIVATE_QMP_ID},mode=control")]
    raw = [word for index, word in enumerate(edit.raw) if index not in drop]
    tail -= sum(1 for index in drop if index < tail)
    raw[tail:tail] = extra
    return RunnerPlan(
        script=script,
        hypervisor=Hypervisor.QEMU,
        share_tags=tuple(fs_chardevs.values()),
        cwd=None,
        raw_words=tuple(raw),
        rm_line=None,
        qmp_fd_word=tail + 1,
        notes=tuple(notes),
        taps=tuple(taps),
    )


def _scan_qemu_options(edit: _Edit, *, tcg: bool) -> tuple[dict[str, list[int]], dict[str, str], list[int]]:
    """(option -> indexes of its argument, virtiofs chardev id -> tag, indexes of words to drop)."""
    script = edit.script
    fs_chardevs: dict[str, str] = {}
    positions: dict[str, list[int]] = {}
    drop: list[int] = []
    i = script.program_index + 1
    end = edit.tail_index()
    while i < end:
        option = edit.values[i]
        if option is None or not option.startswith("-"):
            raise _error(script.path, f"has {script.words[i].raw!r} where a QEMU option belongs")
        if option in QEMU_FLAGS:
            if option == "-enable-kvm" and tcg:
                drop.append(i)
            i += 1
            continue
        positions.setdefault(option, []).append(i + 1)
        value = edit.value(i + 1, option)
        if option == "-device" and value.startswith("vhost-user-fs-"):
            chardev, tag = _get_option(value, "chardev"), _get_option(value, "tag")
            if chardev is None or tag is None:
                raise _error(script.path, f"has a vhost-user-fs device without chardev= or tag=: {value!r}")
            fs_chardevs[chardev] = tag
        i += 2
    return positions, fs_chardevs, drop


def _rewrite_qemu_machine(
    edit: _Edit, positions: dict[str, list[int]], overrides: Overrides, *, tcg: bool
) -> list[str]:
    """-name, the accelerator, the kernel command line and the CPU model; returns notes for the log."""
    for index in positions.get("-name", []):
        edit.set(index, overrides.instance)
    for option in ("-M", "-machine"):
        for index in positions.get(option, []):
            value = edit.value(index, option)
            if tcg and _get_option(value, "accel") is not None:
                edit.set(index, _set_option(value, "accel", "tcg"))
    for index in positions.get("-accel", []):
        if tcg and edit.value(index, "-accel").split(",")[0] != "tcg":
            edit.set(index, "tcg")
    microvm_machine = any(
        edit.value(index, option).split(",")[0] == "microvm"
        for option in ("-M", "-machine")
        for index in positions.get(option, [])
    )
    notes: list[str] = []
    for index in positions.get("-append", []):
        value = edit.value(index, "-append")
        if tcg and microvm_machine and "tsc_early_khz=" not in value:
            if overrides.tsc_khz is None:
                notes.append(
                    "the runner's QEMU now runs a microvm machine under TCG, whose guest kernel may hang "
                    "calibrating its TSC; /proc/cpuinfo does not tell the host's TSC rate (no "
                    'constant_tsc): set qemu.cmdline = "tsc_early_khz=<the host\'s TSC kHz>"'
                )
            else:
                value = f"{value} tsc_early_khz={overrides.tsc_khz}"
        if overrides.cmdline:
            value = f"{value} {overrides.cmdline}"
        if value != edit.value(index, "-append"):
            edit.set(index, value)
    for index in positions.get("-cpu", []):
        model = edit.value(index, "-cpu").split(",")[0]
        if overrides.cpu is not None:
            edit.set(index, overrides.cpu)
        elif tcg and model == "host":
            edit.set(index, "max")
    return notes


def _rewrite_qemu_resources(edit: _Edit, positions: dict[str, list[int]], overrides: Overrides) -> None:
    """--mem and --vcpus."""
    if overrides.memory_mib is not None:
        _set_qemu_memory(edit, positions, overrides.memory_mib)
    if overrides.vcpus is not None:
        for index in positions.get("-smp", []):
            value = edit.value(index, "-smp")
            if not value.isdigit():
                raise _error(
                    edit.script.path, f"has -smp {value!r}, which --vcpus cannot replace (only -smp N)"
                )
            edit.set(index, str(overrides.vcpus))


def _rewrite_qemu_sockets(
    edit: _Edit, positions: dict[str, list[int]], fs_chardevs: dict[str, str], files: InstanceDir
) -> None:
    """The public QMP socket and each virtiofs socket move into the instance dir."""
    qmps = positions.get("-qmp", [])
    if len(qmps) > 1:
        raise _error(edit.script.path, "has more than one -qmp")
    for index in qmps:
        match = re.fullmatch(r"unix:([^,]*)(,.*)?", edit.value(index, "-qmp"))
        if match:
            edit.set(index, f"unix:{qemu_escape(str(files.qmp_socket))}{match.group(2) or ''}")
    for index in positions.get("-chardev", []):
        value = edit.value(index, "-chardev")
        tag = fs_chardevs.get(_get_option(value, "id") or "")
        if tag is not None and value.split(",")[0] == "socket" and _get_option(value, "path") is not None:
            edit.set(index, _set_option(value, "path", str(files.share_socket(tag))))


def _add_qemu_forwards(edit: _Edit, positions: dict[str, list[int]], forwards: Sequence[Forward]) -> None:
    users = [i for i in positions.get("-netdev", []) if edit.value(i, "-netdev").split(",")[0] == "user"]
    if not users:
        raise _error(
            edit.script.path,
            "has no user-mode network (-netdev user,...), which --forward needs: add microvm.interfaces "
            '= [ { type = "user"; id = "usernet"; mac = "..."; } ] (or claude-microvm\'s '
            "qemu.extraArgs) to the VM",
        )
    value = edit.value(users[0], "-netdev")
    edit.set(users[0], ",".join([value, *(forward.hostfwd() for forward in forwards)]))


def _restrict_network(edit: _Edit, positions: dict[str, list[int]], extra: Sequence[str]) -> None:
    """Egress allowlist: the runner's one user netdev gets restrict=on and the proxy's guestfwd; any
    other way out (a tap, a bridge, a socket netdev, -nic/-net) would go around the proxy: refused."""
    path = edit.script.path
    others = [option for option in ("-nic", "-net") if positions.get(option)]
    netdevs = [(i, edit.value(i, "-netdev")) for i in positions.get("-netdev", [])]
    others += [value.split(",")[0] for _, value in netdevs if value.split(",")[0] != "user"]
    users = [(i, value) for i, value in netdevs if value.split(",")[0] == "user"]
    if others or len(users) != 1:
        found = ", ".join(others) or f"{len(users)} user netdevs"
        raise _error(
            path,
            f'has network devices the egress allow-list cannot cover ({found}): network.mode = "allowlist" '
            'needs exactly one -netdev user (microvm.interfaces = [ { type = "user"; ... } ]) and no '
            'tap, bridge or -nic; or leave network.mode out ("open")',
        )
    index, value = users[0]
    net = _get_option(value, "net")
    if net is not None and net.split("/")[0] != "10.0.2.0":
        raise _error(
            path,
            f"has -netdev user,net={net}; the egress proxy's address 10.0.2.100 needs QEMU's default "
            "network 10.0.2.0/24: drop net= from the runner's user interface",
        )
    kept = _join_options([(k, v) for k, v in _options(value) if k not in ("restrict", "guestfwd")])
    edit.set(index, ",".join([kept, *extra]))


def _set_qemu_memory(edit: _Edit, positions: dict[str, list[int]], mib: int) -> None:
    for index in positions.get("-m", []):
        value = edit.value(index, "-m")
        if not re.fullmatch(r"\d+M?", value):
            raise _error(edit.script.path, f"has -m {value!r}, which --mem cannot replace (only -m NM)")
        edit.set(index, f"{mib}M")
    for index in positions.get("-object", []):
        value = edit.value(index, "-object")
        if value.split(",")[0].startswith("memory-backend-") and _get_option(value, "id") == "mem":
            edit.set(index, _set_option(value, "size", f"{mib}M"))


def plan_cloud_hypervisor(script: RunnerScript, instance_dir: Path, overrides: Overrides) -> RunnerPlan:
    if "," in str(instance_dir):
        # cloud-hypervisor's option lists have no escape for a comma in a value (QEMU's is ',,').
        raise _error(
            script.path,
            f"runs cloud-hypervisor, whose options cannot hold a path with a ',', and the instance dir "
            f"{instance_dir} has one: choose a runtime dir without ',' (--runtime-dir)",
        )
    if overrides.forwards:
        raise _error(
            script.path,
            "runs cloud-hypervisor, which has no user-mode network for --forward: use a tap interface "
            "and reach the guest's address instead, or a QEMU runner",
        )
    edit = _Edit(script)
    _rewrite_argv0(edit, overrides.instance)
    tags: list[str] = []
    api: list[int] = []
    taps: list[RunnerTap] = []
    i = script.program_index + 1
    end = edit.tail_index()
    while i < end:
        option = edit.values[i]
        if option is None or not option.startswith("--"):
            raise _error(script.path, f"has {script.words[i].raw!r} where a cloud-hypervisor option belongs")
        j = i + 1
        while j < end and not (edit.values[j] or "").startswith("--"):
            value = edit.value(j, option)
            if option == "--fs":
                tag = _get_option(value, "tag")
                if tag is None or _get_option(value, "socket") is None:
                    raise _error(script.path, f"has --fs {value!r} without socket= or tag=")
                edit.set(j, _set_option(value, "socket", str(InstanceDir(instance_dir).share_socket(tag))))
                tags.append(tag)
            elif option == "--api-socket":
                api.append(j)
            elif option == "--net" and (tap := _ch_tap(script.path, value)) is not None:
                taps.append(tap)
            elif option == "--memory" and overrides.memory_mib is not None:
                if _get_option(value, "hotplug_method") is not None:
                    raise _error(script.path, "uses memory hotplug, whose size --mem cannot replace")
                edit.set(j, _set_option(value, "size", f"{overrides.memory_mib}M"))
            elif option == "--cpus" and overrides.vcpus is not None:
                edit.set(j, _set_option(value, "boot", str(overrides.vcpus)))
            j += 1
        i = j
    if len(api) > 1:
        raise _error(script.path, "has more than one --api-socket")
    new_api = str(InstanceDir(instance_dir).api_socket)
    rm_line = None
    if api:
        old = edit.value(api[0], "--api-socket")
        old_path = old[len("path=") :] if old.startswith("path=") else old
        if old.startswith("fd="):
            raise _error(script.path, "passes its API socket as fd=, which the supervisor cannot reach")
        edit.set(api[0], ("path=" if old.startswith("path=") else "") + new_api)
        # microvm.nix's preStart removes a stale socket first (`rm -f 'SOCKET'`): keep that pairing.
        for index, line in enumerate(script.lines):
            if index == script.exec_line:
                continue
            try:
                words = split_words(line)
            except ValueError:
                continue
            if [word.value for word in words] == ["rm", "-f", old_path]:
                rm_line = index
    else:
        tail = edit.tail_index()
        edit.raw[tail:tail] = ["--api-socket", _quote(new_api)]
    return RunnerPlan(
        script=script,
        hypervisor=Hypervisor.CLOUD_HYPERVISOR,
        share_tags=tuple(tags),
        cwd=None,
        raw_words=tuple(edit.raw),
        rm_line=rm_line,
        qmp_fd_word=None,
        taps=tuple(taps),
    )


def plan_runner(
    script: RunnerScript, hypervisor: Hypervisor, instance_dir: Path, overrides: Overrides, cwd: Path | None
) -> RunnerPlan:
    if hypervisor is Hypervisor.QEMU:
        planned = plan_qemu(script, instance_dir, overrides)
    else:
        planned = plan_cloud_hypervisor(script, instance_dir, overrides)
    duplicates = sorted({tag for tag in planned.share_tags if planned.share_tags.count(tag) > 1})
    if duplicates:
        raise _error(script.path, f"names the virtiofs tag {duplicates[0]!r} twice")
    return dataclasses.replace(planned, cwd=cwd)
