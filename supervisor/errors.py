"""The supervisor's own error type and its exit-code contract.

The exit status of `agentvm-supervise run` is the runner's (for the built-in guest: the guest
command's), 128+N when the supervisor was stopped by signal N, or one of the named codes below
when the supervisor itself could not do its job. The named codes follow sysexits(3) where one fits.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    USAGE = 64  # bad flag, bad config file, bad value
    NO_INPUT = 66  # a file or directory the config names does not exist
    UNAVAILABLE = 69  # a required binary, device or kernel feature is missing
    INTERNAL = 70  # a bug: the traceback is shown with --debug
    CANT_CREATE = 73  # the runtime dir or a socket could not be created
    SHARE_FAILED = 75  # a virtiofsd died or never became ready while the VM needed it
    RUNNER_FAILED = 76  # the runner died before the guest could report a status
    GUEST_FAILED = 77  # the built-in guest reported an error before running the command
    STOPPED_FROM_CONSOLE = 130  # the console's escape key stopped the VM before the command ended
    SIGNAL_BASE = 128  # 128+N: stopped by signal N


class SupervisorError(Exception):
    """An error the user can act on: one paragraph naming the thing and the remedy."""

    def __init__(self, message: str, *, exit_code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
