"""Regression: `podman stop` right after `podman run` was lost. As PID 1, SIGTERM while Python was
still importing the supervisor (~0.3 s) had no handler, so the kernel dropped it; the engine then
waited out its stop timeout and SIGKILLed (exit 137). entry.py now holds stop signals from the
first instruction. A stand-in `structlog` on PYTHONPATH blocks the import on a FIFO, so the signal
lands inside the import every time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.container_support import Launched, in_new_pid_namespace, proc_state
from tests.support import REPO, supervisor_argv

SHADOW = textwrap.dedent(
    """
    import sys
    open({marker!r}, "w").close()
    with open({fifo!r}) as gate:  # blocks until the test has sent its signal
        gate.read()
    sys.path.remove({shadow!r})
    del sys.modules["structlog"]
    import structlog as real
    sys.modules["structlog"] = real
    """
)


def test_sigterm_while_importing_stops_pid1_at_once(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    fifo = tmp_path / "gate"
    marker = tmp_path / "importing"
    os.mkfifo(fifo)
    (shadow / "structlog.py").write_text(
        SHADOW.format(fifo=str(fifo), shadow=str(shadow), marker=str(marker))
    )
    sup = Launched(
        in_new_pid_namespace([*supervisor_argv(), "run", "--config", str(tmp_path / "missing.toml")]),
        tmp_path,
        env={"PYTHONPATH": f"{shadow}:{REPO}"},
    )
    try:
        init = sup.namespace_init()
        deadline = time.monotonic() + 20
        # Blocked in open(FIFO) inside `import structlog`: well inside the imports.
        while not marker.exists() or proc_state(init) != "S":
            assert time.monotonic() < deadline, "the import never reached the FIFO"
            time.sleep(0.01)
        os.kill(init, signal.SIGTERM)
        # let the import go on; if the import was one after the unblock, the supervisor acts on the
        # signal at once and is gone before it reads (the gate's writer then gets EPIPE)
        with contextlib.suppress(BrokenPipeError), fifo.open("w") as gate:
            gate.write("go")
        # Before the fix: the signal was dropped, and the run failed on the missing config (66).
        assert sup.wait(timeout=30) == 128 + signal.SIGTERM, sup.stderr()
        assert "stopped by SIGTERM while starting" in sup.stderr()
    finally:
        sup.kill()


AUDIT = textwrap.dedent(
    """
    import signal, sys

    def hook(event, args):
        if event == "import" and args[0] == "msgspec":
            held = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            sys.stderr.write("msgspec imported with SIGTERM " + ("held" if held else "deliverable") + "\\n")

    sys.addaudithook(hook)
    sys.argv = ["agentvm-supervise", *sys.argv[1:]]
    from supervisor.entry import main
    main()
    """
)


def test_msgspec_is_imported_while_the_stop_signals_are_held(tmp_path: Path) -> None:
    """A stop signal whose handler raises during msgspec's import leaves msgspec 0.23 broken: the
    exception is swallowed in its module init and the first decode then dereferences NULL
    (SIGSEGV; the fault suite's rare exit -11, reproduced by a SIGALRM 5-9 ms into importing
    supervisor.config). So the CLI imports it, and builds the start's decoders, before it lets the
    held signals in. An audit hook sees the mask at the moment of the import."""
    result = subprocess.run(
        [sys.executable, "-c", AUDIT, "run", "--config", str(tmp_path / "missing.toml")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 66, result.stderr
    assert "msgspec imported with SIGTERM held" in result.stderr, result.stderr
