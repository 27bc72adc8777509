"""Refreshing the dev shell cache before the VM starts: a child of the instance, never fatal.

launcher.py plans the refresh (`plan_devshell`: which tool, which files); this runs it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from supervisor import launcher
from supervisor.children import Child, ChildSpec


async def refresh_devshell(
    devshell: launcher.Devshell,
    *,
    run_child: Callable[..., Coroutine[Any, Any, None]],
    env: dict[str, str],
    kill_grace: float,
    log: Any,
) -> Child | None:
    """Cache the project's dev shell for the guest; a failure is logged, never fatal. Returns the
    child that ran the tool (None when the tool is missing)."""
    child: Child | None = None
    if devshell.argv is not None:
        log.warning("caching the dev shell environment", command=" ".join(devshell.argv))
        stdout, stderr = launcher.open_devshell_outputs(devshell)
        spec = ChildSpec(
            name="devshell",
            argv=devshell.argv,
            stdout=stdout,
            stderr=stderr,
            env=env,
            cwd=str(devshell.work_dir),
            kill_grace=kill_grace,
        )
        try:
            async with anyio.create_task_group() as tg:
                child = await tg.start(run_child, spec)
        except BaseException:  # stopped by a signal: no half-written cache stays behind
            devshell.discard()
            raise
        finally:
            os.close(stdout)
            os.close(stderr)
    if not launcher.finish_devshell(devshell, child.status if child is not None else None):
        log.warning(
            "could not cache the dev shell; the guest starts without it", details=str(devshell.errors)
        )
    return child
