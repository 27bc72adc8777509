"""Config and command-line fuzzing: whatever the TOML and the flags say, the supervisor either
starts (here: the stub QEMU, which exits 0 at once) or gives one clear error; never a traceback or
an internal error (exit 70), never a hang, and nothing touched outside the sandbox the example's
paths point into except what the config asks to create, and nothing left in the runtime dir.

Each example runs `supervisor.cli.main` in a fork of the test process (the imports are paid once),
with its environment, working dir and std streams set up like a fresh process's. Every path the
strategies produce is inside a per-example sandbox (or one of a few fixed system paths that exist or
cannot be created), binaries are stubs or harmless (`/bin/false`, missing files), so a valid start
boots nothing real and nothing outside the sandbox is ever created.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from supervisor import cli, config, guest
from tests.faults import CASE_ENV, FAKE_QEMU, FAKE_VIRTIOFSD, case_processes
from tests.support import TEST_CACHE

SANDBOX = "@S@"  # replaced by the example's sandbox dir
EXAMPLE_TIMEOUT_S = 60.0
CLEAR_ERRORS = {64, 66, 69, 73, 75, 76, 77}

# ---- strategies ---------------------------------------------------------------------------------

# No ".." anywhere: a share or agent-home the config asks to create must stay inside the sandbox.
_names = [
    "work",
    "home",
    "data",
    "a b",
    "x" * 200,
    ".",
    "sub/dir",
    "new",
    "new/deeper",
    "file.txt",
    "nul\x00",
    "nl\nx",  # a newline once reached the watchdog's line protocol (issue 11, D6)
    "esc\x1b[31m",
    "rt,logfile=leak",  # a comma once added options to QEMU's -chardev (D7)
    # Links as a guest could plant them (see Sandbox.prepare): never followed into a share source.
    "work/planted",
    "work/planted/new",
    "link",
    "link/new",
]
_texts = st.text(max_size=20).filter(lambda text: ".." not in text)
sandbox_paths = st.one_of(
    st.sampled_from([f"{SANDBOX}/{name}" for name in _names]),
    _texts.map(lambda text: f"{SANDBOX}/" + text.lstrip("/")),
)
fixed_paths = st.sampled_from(["/proc/no-such-dir", "/dev/null", "/proc", "/etc/hostname"])
relative_paths = _texts.filter(lambda text: not text.startswith(("/", "~")))
paths = st.one_of(sandbox_paths, sandbox_paths, fixed_paths, relative_paths, st.just("~/proj"))
junk = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.sampled_from(["x", "tag"]), st.integers(), max_size=1),
)


qemu_binaries = st.sampled_from(
    [str(FAKE_QEMU), str(FAKE_QEMU), "qemu-system-x86_64", "/bin/false", f"{SANDBOX}/file.txt",
     f"{SANDBOX}/missing", "no-such-qemu", ""]
)  # fmt: skip
virtiofsd_binaries = st.sampled_from(
    [str(FAKE_VIRTIOFSD), str(FAKE_VIRTIOFSD), "virtiofsd", "/bin/false", f"{SANDBOX}/file.txt",
     f"{SANDBOX}/missing", ""]
)  # fmt: skip
existing_dirs = st.sampled_from([f"{SANDBOX}/work", f"{SANDBOX}/data", f"{SANDBOX}/home", f"{SANDBOX}/cwd"])


def documents(*, junk_fields: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Config documents: with `junk_fields`, any field may hold any TOML value and strings are
    arbitrary; without, values have the right type and are mostly valid, so most documents start."""

    def field(
        valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any] | None = None
    ) -> st.SearchStrategy[Any]:
        if not junk_fields:
            return valid
        return st.one_of(valid, wild, junk) if wild is not None else st.one_of(valid, junk)

    text = st.one_of(st.text(max_size=20), st.sampled_from(["", "a\x00b", "-x", "$(id)", "é"]))
    tags = st.sampled_from(["work", "home", "data", "x-1", "a.b"])
    sources = st.one_of(existing_dirs, existing_dirs, paths)
    qemu_args = st.lists(st.sampled_from(["-nographic", "-S", "-no-reboot"]), max_size=2)
    virtiofsd_args = st.lists(st.sampled_from(["--xattr", "--readonly"]), max_size=2)
    seconds = st.floats(min_value=0.05, max_value=2)
    share = st.fixed_dictionaries(
        {"tag": field(tags, text), "source": field(sources)},
        optional={
            "guest-path": field(st.sampled_from(["/mnt/a", "/work", "/srv/x-y"]), text),
            "read-only": field(st.booleans()),
            "guest-uid": field(st.integers(0, 70000), st.integers()),
            "guest-gid": field(st.integers(0, 70000), st.integers()),
            "host-uid": field(st.integers(0, 70000), st.integers()),
            "host-gid": field(st.integers(0, 70000), st.integers()),
            "uid-mapping": field(st.sampled_from(["auto", "translate", "none", "user-namespace"]), text),
            "xattr": field(st.booleans()),
            "xattrmap": field(st.just(":map::user.virtiofs.:"), text),
            "cache": field(st.sampled_from(["auto", "always", "never", "metadata"]), text),
            "create": field(st.booleans()),
        },
    )
    return st.fixed_dictionaries(
        {},
        optional={
            "name": field(st.from_regex(config.NAME_PATTERN, fullmatch=True), text),
            "runtime-dir": field(st.just(f"{SANDBOX}/rt"), paths),
            "work-dir": field(existing_dirs, paths),
            "agent-home": field(st.sampled_from([f"{SANDBOX}/home", f"{SANDBOX}/new/home"]), paths),
            "shares": st.lists(share, max_size=4, unique_by=lambda share: str(share.get("tag"))),
            "virtiofsd": st.fixed_dictionaries(
                {},
                optional={
                    "binary": field(st.just(str(FAKE_VIRTIOFSD)), virtiofsd_binaries),
                    "socket-mode": field(st.sampled_from(["fd", "path"]), text),
                    "sandbox": field(st.sampled_from(["namespace", "none"]), text),
                    "extra-args": field(virtiofsd_args, st.lists(text, max_size=3)),
                },
            ),
            "qemu": st.fixed_dictionaries(
                {"binary": field(st.just(str(FAKE_QEMU)), qemu_binaries)},
                optional={
                    "machine": field(st.sampled_from(["q35", "microvm"]), text),
                    "accel": field(st.sampled_from(["auto", "tcg"]), st.sampled_from(["kvm", "hvf"])),
                    "cpu": field(st.sampled_from(["max", "qemu64"]), text),
                    "kernel": field(st.just(f"{SANDBOX}/kernel"), paths),
                    "initrd": field(st.just(f"{SANDBOX}/kernel"), paths),
                    "cmdline": field(st.sampled_from(["", "quiet", "loglevel=3"]), text),
                    "memory-mib": field(st.integers(64, 4096), st.integers()),
                    "vcpus": field(st.integers(1, 4), st.integers()),
                    "extra-args": field(qemu_args, st.lists(text, max_size=3)),
                    "sandbox": field(st.booleans(), st.one_of(text, st.integers())),
                },
            ),
            "timeouts": st.fixed_dictionaries(
                {},
                optional={
                    name: field(seconds, st.floats())
                    for name in ("socket-ready", "graceful-stop", "quit", "kill-grace")
                },
            ),
        },
    )


# ---- TOML out of those documents ----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's basic-string ones; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def to_toml(document: Mapping[str, Any]) -> str:
    lines, tables = [], []
    for key, value in document.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif (
            key == "shares" and isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        ):
            tables += [(key, item) for item in value]
        else:
            lines.append(f"{json.dumps(key)} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"[[{key}]]" if key == "shares" else f"[{key}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


# ---- one example ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    hung: bool


def _fill(value: str, sandbox: Path) -> str:
    return value.replace(SANDBOX, str(sandbox))


def run_cli(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path) -> Outcome:
    """`cli.main(argv)` in a forked child, as a fresh process would run it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                os.setpgid(0, 0)
                os.chdir(cwd)
                os.environ.clear()
                os.environ.update(env)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
                    signal.signal(signum, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdin = open(0, closefd=False)  # noqa: SIM115
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                code = cli.main(list(argv))
            except SystemExit as exit_:  # argparse's --help / --version
                code = exit_.code if isinstance(exit_.code, int) else 0
            except BaseException:
                traceback.print_exc()
                code = 98
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + EXAMPLE_TIMEOUT_S
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        hung = status is None or not done
        if hung:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        assert status is not None
        out.seek(0)
        err.seek(0)
        return Outcome(
            os.waitstatus_to_exitcode(status),
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            hung,
        )


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, float]]:
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        if Path(directory) == skip or skip in Path(directory).parents:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            path = Path(directory) / name
            with contextlib.suppress(OSError):
                info = path.lstat()
                found[str(path)] = (info.st_mode, info.st_size, info.st_mtime)
    return found


@dataclass
class Sandbox:
    root: Path
    bin: Path

    def prepare(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        for name in ("cwd", "home", "run", "work", "data"):
            (self.root / name).mkdir(parents=True)
        (self.root / "file.txt").write_text("a file, not a dir\n")
        (self.root / "kernel").write_text("not a kernel: the stub QEMU never reads it\n")
        (self.root / "run").chmod(0o700)
        (self.root / "work" / "planted").symlink_to(self.root / "data")
        (self.root / "link").symlink_to(self.root / "home")

    def env(self, example: str) -> dict[str, str]:
        return {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.root / "home"),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "AGENTVM_SUPERVISE_CACHE": str(TEST_CACHE),
            "LANG": "C.UTF-8",
            "STUB_QEMU": "exit-at-once",
            CASE_ENV: example,
        }


@pytest.fixture(scope="module")
def sandbox(guest_assets: guest.GuestAssets) -> Iterator[Sandbox]:
    root = Path(tempfile.mkdtemp(prefix="agentvm-fuzz-", dir="/var/tmp"))
    binaries = root / "bin"
    binaries.mkdir()
    (binaries / "qemu-system-x86_64").symlink_to(FAKE_QEMU)
    (binaries / "virtiofsd").symlink_to(FAKE_VIRTIOFSD)
    yield Sandbox(root / "s", binaries)
    shutil.rmtree(root, ignore_errors=True)


# What the launcher contract writes into the agent home it mounts (issue 5: claude-microvm's guest
# reads them); the fuzzed agent home can be any dir of the sandbox.
LAUNCHER_FILES = {".microvm-env", ".microvm-devshell", ".microvm-devshell.hash", ".microvm-devshell.err"}


def _created_dirs_only(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """New or changed entries that are not plain new dirs (the shares the config asked to create),
    or the launcher's files in the agent home."""
    bad = [path for path in before if after.get(path) != before[path] and not Path(path).is_dir()]
    for path, (mode, _, _) in after.items():
        is_dir = (mode & 0o170000) == 0o040000
        # The console log of the instance (issue 3: kept after the VM, in $XDG_STATE_HOME or log-dir).
        console_log = re.fullmatch(r".+-[0-9a-f]{8}\.log(\.1)?", Path(path).name) is not None
        # Facts about the binaries (issue 17: a second start spawns no probe), in $XDG_STATE_HOME.
        fact = Path(path).parent.name == "facts" and Path(path).parent.parent.name == "agentvm-supervise"
        known = Path(path).name in LAUNCHER_FILES or console_log or fact
        if path not in before and not is_dir and not known:
            bad.append(path)
    return sorted(bad)


def play(sandbox: Sandbox, argv: list[str], example: str) -> list[str]:
    """Run one example and return what went wrong."""
    runtime_dirs = [sandbox.root / "rt", sandbox.root / "run" / "agentvm"]
    before = _snapshot(sandbox.root, sandbox.root / "rt")
    outcome = run_cli(argv, env=sandbox.env(example), cwd=sandbox.root / "cwd")
    if currently_in_test_context():
        event(f"exit {outcome.code}")  # --hypothesis-show-statistics: how many started
    problems = []
    if outcome.hung:
        problems.append(f"no exit within {EXAMPLE_TIMEOUT_S:g} s")
    if outcome.code in (70, 98, 99) or "Traceback" in outcome.stderr or "internal error" in outcome.stderr:
        problems.append(f"an internal error (exit {outcome.code})")
    paragraphs = [line for line in outcome.stderr.splitlines() if line.startswith("agentvm-supervise: ")]
    usage = outcome.code == 64 and outcome.stderr.startswith("usage: ")  # no command: the help
    if outcome.code in CLEAR_ERRORS and len(paragraphs) != 1 and not usage:
        problems.append(f"exit {outcome.code} with {len(paragraphs)} error paragraphs, wanted one")
    # A custom runner's own status, with what it said (the stub QEMU refusing an argument).
    runner_failed = outcome.code == 1 and "runner failed" in outcome.stderr and "output" in outcome.stderr
    if outcome.code not in CLEAR_ERRORS | {0} and not runner_failed:
        problems.append(f"exit {outcome.code} is neither a start nor a clear error")
    left = case_processes(example)
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = case_processes(example)
    if left:
        problems.append(f"processes left: {left}")
    for runtime in runtime_dirs:
        if runtime.is_dir() and any(runtime.iterdir()):
            problems.append(f"left in the runtime dir: {sorted(map(str, runtime.iterdir()))}")
    changed = _created_dirs_only(before, _snapshot(sandbox.root, sandbox.root / "rt"))
    changed = [path for path in changed if not any(Path(path).is_relative_to(r) for r in runtime_dirs)]
    if changed:
        problems.append(f"files touched outside the runtime dir: {changed}")
    for pid in left:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid.split()[0]), signal.SIGKILL)
    if problems:
        problems.append(f"exit {outcome.code}; stderr: {outcome.stderr[-1200:]!r}")
    return problems


# AGENTVM_FUZZ_EXAMPLES raises the count for a long run (README, "Fault injection and fuzzing").
EXAMPLES = int(os.environ.get("AGENTVM_FUZZ_EXAMPLES") or 200)
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@settings(FUZZ_SETTINGS, max_examples=max(1, EXAMPLES // 2))  # most of these start: slower
@given(document=documents(junk_fields=False))
def test_random_valid_looking_toml_starts_or_gives_one_clear_error(
    sandbox: Sandbox, document: dict[str, Any]
) -> None:
    _play_document(sandbox, document, None)


@FUZZ_SETTINGS
@given(document=documents(junk_fields=True), extra=st.one_of(st.none(), st.text(max_size=30)))
def test_random_toml_gives_a_start_or_one_clear_error(
    sandbox: Sandbox, document: dict[str, Any], extra: str | None
) -> None:
    _play_document(sandbox, document, extra)


def _play_document(sandbox: Sandbox, document: dict[str, Any], extra: str | None) -> None:
    sandbox.prepare()
    text = to_toml(json.loads(_fill(json.dumps(document), sandbox.root)))
    if extra is not None:  # sometimes not TOML at all
        text += extra
    path = sandbox.root / "config.toml"
    path.write_text(text, errors="surrogateescape")
    problems = play(sandbox, ["run", "--config", str(path)], f"fuzz-{os.getpid()}-{time.monotonic_ns()}")
    assert not problems, f"config:\n{text}\n" + "\n".join(problems)


flag_values: dict[str, st.SearchStrategy[str]] = {
    "--config": st.one_of(st.just(f"{SANDBOX}/config.toml"), paths),
    "--work-dir": paths,
    "--agent-home": paths,
    "--runtime-dir": st.one_of(st.just(f"{SANDBOX}/rt"), paths),
    "--name": st.one_of(st.from_regex(config.NAME_PATTERN, fullmatch=True), st.text(max_size=45)),
    "--accel": st.sampled_from(["auto", "kvm", "tcg", "bogus"]),
    "--machine": st.sampled_from(["q35", "microvm", "pc"]),
    "--mem": st.one_of(st.integers(-5, 1 << 21).map(str), st.text(max_size=5)),
    "--vcpus": st.one_of(st.integers(-2, 300).map(str), st.text(max_size=5)),
    "--qemu": qemu_binaries,
    "--virtiofsd": virtiofsd_binaries,
    "--socket-mode": st.sampled_from(["fd", "path", "x"]),
    "--escape-key": st.one_of(st.sampled_from(["ctrl-]", "^A", "none", "ctrl-", "x"]), st.text(max_size=4)),
    "--log-format": st.sampled_from(["human", "json", "xml"]),
}
switches = st.sampled_from(["-v", "--verbose", "--debug", "--help", "--version", "--bogus", "-x"])
flag = st.one_of(
    st.sampled_from(sorted(flag_values)).flatmap(
        lambda name: flag_values[name].map(lambda value: [name, value])
    ),
    switches.map(lambda name: [name]),
    st.text(max_size=10).map(lambda token: [token]),
)
command_lines = st.tuples(
    st.sampled_from([["run"], ["run"], ["run"], [], ["stop"]]),
    st.lists(flag, max_size=5),
    st.one_of(st.just([]), st.lists(st.text(max_size=8), max_size=3).map(lambda cmd: ["--", *cmd])),
)


@FUZZ_SETTINGS
@given(parts=command_lines)
def test_random_command_lines_give_a_start_or_one_clear_error(
    sandbox: Sandbox, parts: tuple[list[str], list[list[str]], list[str]]
) -> None:
    sandbox.prepare()
    (sandbox.root / "config.toml").write_text(
        f'runtime-dir = "{sandbox.root}/rt"\n[qemu]\nbinary = "{FAKE_QEMU}"\n'
        f'[virtiofsd]\nbinary = "{FAKE_VIRTIOFSD}"\n'
    )
    command, flags, guest_command = parts
    argv = [*command, "--config", str(sandbox.root / "config.toml")] if command else []
    argv += [_fill(token, sandbox.root) for pair in flags for token in pair] + guest_command
    problems = play(sandbox, argv, f"fuzz-{os.getpid()}-{time.monotonic_ns()}")
    assert not problems, f"argv: {argv!r}\n" + "\n".join(problems)


# A NUL byte in any string (a path, an argument) made pathlib or exec raise ValueError: exit 70.
NUL_FIELDS = [
    ("name", None), ("runtime-dir", None), ("work-dir", None), ("agent-home", None),
    ("binary", "qemu"), ("cpu", "qemu"), ("kernel", "qemu"), ("initrd", "qemu"), ("cmdline", "qemu"),
    ("binary", "virtiofsd"), ("sandbox", "virtiofsd"),
    ("tag", "shares"), ("source", "shares"), ("guest-path", "shares"), ("xattrmap", "shares"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "section"), NUL_FIELDS)
def test_nul_byte_in_any_string_field_is_a_clear_error(
    sandbox: Sandbox, key: str, section: str | None
) -> None:
    sandbox.prepare()
    document: dict[str, Any] = {"runtime-dir": f"{SANDBOX}/rt", "qemu": {"binary": str(FAKE_QEMU)}}
    bad = (
        f"{SANDBOX}/a\x00b"
        if key in ("runtime-dir", "work-dir", "agent-home", "source", "kernel")
        else "a\x00b"
    )
    if section is None:
        document[key] = bad
    elif section == "shares":
        document["shares"] = [{"tag": "work", "source": f"{SANDBOX}/work", "create": True, key: bad}]
    else:
        document.setdefault(section, {})[key] = bad
    path = sandbox.root / "config.toml"
    path.write_text(to_toml(json.loads(_fill(json.dumps(document), sandbox.root))))
    problems = play(sandbox, ["run", "--config", str(path)], f"fuzz-{os.getpid()}-{time.monotonic_ns()}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b", "\x7f"])
@pytest.mark.parametrize("flag", ["--work-dir", "--runtime-dir", "--qemu", "--name"])
def test_control_characters_in_flags_are_a_clear_error(sandbox: Sandbox, flag: str, char: str) -> None:
    sandbox.prepare()
    (sandbox.root / "config.toml").write_text(f'[qemu]\nbinary = "{FAKE_QEMU}"\n')
    argv = ["run", "--config", str(sandbox.root / "config.toml"), flag, f"{sandbox.root}/a{char}b"]
    problems = play(sandbox, argv, f"fuzz-{os.getpid()}-{time.monotonic_ns()}")
    assert not problems, "\n".join(problems)
