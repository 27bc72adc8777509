"""The entry point (console script, `python -m supervisor`): stop signals are held from the start.

As PID 1 of a container the kernel drops any signal that has no handler (see pid1.py). Importing
the supervisor takes ~0.3 s (anyio, structlog, msgspec; longer on a cold page cache), and a
`podman stop` in that window used to vanish: the engine waited out its stop timeout and then
SIGKILLed. So this module imports nothing but `signal`, records stop signals while the rest is
imported, and hands them to cli.main, which installs the real handlers first and then acts on
what was held (exit 128+N, nothing started).
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import NoReturn


def main() -> NoReturn:
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, hold)
    from supervisor import cli  # the slow import, once the handlers exist

    cli.entry(held)
