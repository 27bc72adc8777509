"""Regression: `podman stop` right after `podman run` was lost. As PID 1, SIGTERM while Python was
still importing the supervisor (~0.3 s) had no handler, so the kernel dropped it; the engine then
waited out its stop timeout and SIGKILLed (exit 137). entry.py now holds stop signals from the
first instruction. A stand-in `structlog` on PYTHONPATH blocks the import on a FIFO, so the signal
lands inside the import every time."""

from __future__ import annotations

import os
import signal
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
        with fifo.open("w") as gate:  # let the import go on
            gate.write("go")
        # Before the fix: the signal was dropped, and the run failed on the missing config (66).
        assert sup.wait(timeout=30) == 128 + signal.SIGTERM, sup.stderr()
        assert "stopped by SIGTERM while starting" in sup.stderr()
    finally:
        sup.kill()
