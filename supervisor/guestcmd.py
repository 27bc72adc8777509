"""`agentvm-supervise guest build|list|remove`: the agent guests in the asset cache (agentguest.py).

`build` is what a container image runs at image time (and what a root user runs once for the
unprivileged users of a shared cache); `run --agent FLAVOR` builds on first use otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from supervisor.errors import ExitCode, SupervisorError

if TYPE_CHECKING:
    from supervisor.config import Agent

# The parser is built for every command: the modules that do the work are imported by run().
FLAVORS = ("claude", "gemini", "codex")  # config.Agent's values


def _flavor(value: str) -> Agent:
    from supervisor import agentguest

    return agentguest.flavor_of(value)  # raises the one-paragraph error


def add_parser(commands: Any) -> None:
    cmd = commands.add_parser(
        "guest",
        help="build, list or remove the agent guests (claude, gemini, codex) in the asset cache",
        description="The agent guest of a flavor is a Debian root file system with the flavor's CLI, "
        "built from Debian's and npm's packages into the asset cache ($AGENTVM_SUPERVISE_CACHE, else "
        "$XDG_CACHE_HOME/agentvm-supervise). 'run --agent FLAVOR' builds it on first use.",
    )
    verbs = cmd.add_subparsers(dest="guest_verb", metavar="VERB", required=True)
    build = verbs.add_parser("build", help="build a flavor's guest now (the newest CLI unless --cli-version)")
    build.add_argument("--agent", type=_flavor, default="claude", metavar="FLAVOR", help=", ".join(FLAVORS))
    build.add_argument("--cli-version", metavar="V", help="the CLI's npm version (default: latest)")
    verbs.add_parser("list", help="list the built agent guests, their versions and sizes")
    remove = verbs.add_parser("remove", help="remove built agent guests from the cache")
    which = remove.add_mutually_exclusive_group(required=True)
    which.add_argument("--agent", type=_flavor, metavar="FLAVOR", help="the guests of this flavor")
    which.add_argument("--all", action="store_true", help="every agent guest")
    verbs.add_parser(
        "prune",
        help="remove the agent guests no run would pick (older CLI versions, older build scripts)",
    )


def run(args: argparse.Namespace) -> int:
    from supervisor import agentguest, guest

    env = os.environ
    if args.guest_verb == "build":
        release = agentguest.resolve_release(env, args.agent, args.cli_version)
        target = agentguest.guest_dir(env, release.flavor, release.version)
        if (target / "VERSIONS").is_file():
            print(f"already built: {agentguest.describe(agentguest.AgentGuest(target))}")
            return ExitCode.OK
        built = agentguest.build(env, release)
        print(f"built: {agentguest.describe(built)}")
        return ExitCode.OK
    if args.guest_verb == "list":
        found = agentguest.built_guests(env)
        current = agentguest.sources_hash()
        if not found:
            print(f"no agent guest is built in {guest.cache_root(env)}")
        for item in found:
            stale = "" if item.directory.name.endswith(current) else " (older build scripts: unused)"
            print(agentguest.describe(item) + stale)
        return ExitCode.OK
    if args.guest_verb in ("remove", "prune"):
        if args.guest_verb == "prune":
            removed = agentguest.prune(env)
        else:
            removed = agentguest.remove(env, None if args.all else args.agent)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"no agent guest to {args.guest_verb}", file=sys.stderr)
        return ExitCode.OK
    raise SupervisorError(f"unknown guest verb {args.guest_verb}")
