"""The console script's entry point: catches a stop signal that lands while the CLI is imported.

Importing the CLI (anyio, structlog, msgspec) takes ~0.1 s, before any signal handler of ours
exists: a Ctrl-C then raised KeyboardInterrupt with a traceback. So the stop signals are blocked
while it imports, and unblocked by the CLI once its handlers are in place: one that came meanwhile
is then handled like any stop signal during the start (one line, exit 128+N). A KeyboardInterrupt
before the block (this module imports nothing heavy) is said in one line too.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # loaded by the interpreter itself: no import window

# The stop signals pid1.StopSignals handles: held back from here on while the CLI imports, then
# delivered to its handlers (cli.main unblocks them). Blocked at import: the earliest moment of ours.
HELD = {_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP}
_signal.pthread_sigmask(_signal.SIG_BLOCK, HELD)

import sys  # noqa: E402 - after the block on purpose

PROG = "agentvm-supervise"
SIGINT_STATUS = 130  # 128 + SIGINT


def main() -> int:
    """Returns only for a Ctrl-C while importing: `cli.entry` exits the process itself."""
    try:
        from supervisor.cli import entry

        entry(unblock=HELD)
    except KeyboardInterrupt:
        print(
            f"{PROG}: stopped by SIGINT while starting, before any VM process existed; nothing was "
            "left behind.",
            file=sys.stderr,
        )
        return SIGINT_STATUS
