"""Which dev-shell inputs the user allowed the host to evaluate (`agentvm-supervise allow`).

With DIRENV_ALLOW=1 the host evaluates the project's flake.nix or devenv.nix (`nix print-dev-env`,
`--impure` for devenv) before the VM starts. The project dir is the guest's /work, so the guest
can rewrite that Nix code, and the host would run it on the next start: the same door as a share
source the guest can replace, one level up. An impure evaluation can read any file of the user
(`builtins.readFile ~/.ssh/id_ed25519`) into the environment the guest then gets, and a build on a
host without Nix's sandbox runs as the user.

So, as direnv does for .envrc: the host evaluates only inputs whose content the user allowed, on
the host, with `agentvm-supervise allow` (run it after reviewing them); the approval is a map of
file -> sha256 kept in $XDG_STATE_HOME/agentvm-supervise/devshell-allowed/, which the guest cannot
reach. When the inputs changed since, the start goes on with the previous dev-shell cache and a
warning naming the changed files. The inputs are the files nix or devenv read as code: flake.nix,
flake.lock, the devenv files and every *.nix file of the project (hidden dirs and node_modules
left out; symlinks hashed as links). Code a flake loads from a file with another name is not covered.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import msgspec

from supervisor import xdg
from supervisor.errors import ExitCode, SupervisorError

NAMED_INPUTS = ("flake.nix", "flake.lock", ".devenv.flake.nix", "devenv.nix", "devenv.yaml", "devenv.lock")
SKIPPED_DIRS = frozenset({"node_modules"})  # and every hidden dir (.git, .direnv, .devenv, ...)
MAX_FILES = 100_000  # entries looked at: a bigger tree is hashed as "too big", never as allowed


def store_dir(env: Mapping[str, str]) -> Path:
    return xdg.base("XDG_STATE_HOME", env) / xdg.APP / "devshell-allowed"


def _record_path(work_dir: Path, env: Mapping[str, str]) -> Path:
    key = hashlib.sha256(os.fsencode(work_dir)).hexdigest()[:32]
    return store_dir(env) / f"{key}.json"


def _file_digest(path: Path) -> str:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        return "link:" + str(path.readlink())
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not-a-file"
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def inputs(work_dir: Path) -> dict[str, str]:
    """relative path -> sha256 (or link target) of every dev-shell input of `work_dir`."""
    found: dict[str, str] = {}
    seen = 0
    for root, dirs, files in os.walk(work_dir):  # does not follow symlinked dirs
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        seen += len(dirs) + len(files)
        if seen > MAX_FILES:
            return {"": f"more than {MAX_FILES} entries"}
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), work_dir)  # noqa: PTH118
            if name.endswith(".nix") or relative in NAMED_INPUTS:
                with contextlib.suppress(OSError):
                    found[relative] = _file_digest(Path(root) / name)
    for name in NAMED_INPUTS:  # hidden ones (.devenv.flake.nix) are not reached by the walk
        if name not in found:
            with contextlib.suppress(OSError):
                found[name] = _file_digest(work_dir / name)
    return dict(sorted(found.items()))


def changed_since_allowed(work_dir: Path, env: Mapping[str, str]) -> list[str] | None:
    """None when the current inputs are exactly the allowed ones; else the files that differ
    (all of them when nothing was ever allowed)."""
    current = inputs(work_dir)
    try:
        fd = os.open(_record_path(work_dir, env), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as record:
            allowed = msgspec.json.decode(record.read(), type=dict[str, str])
    except (OSError, msgspec.DecodeError):
        allowed = {}
    if current == allowed and "" not in current:
        return None
    return sorted(
        name or "(the tree)" for name in set(current) | set(allowed) if current.get(name) != allowed.get(name)
    )


def refusal(work_dir: Path, env: Mapping[str, str]) -> str | None:
    """The warning for a start that must not evaluate the dev shell, or None when it may."""
    changed = changed_since_allowed(work_dir, env)
    if changed is None:
        return None
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    return (
        f"the dev shell of {work_dir} is not evaluated: its Nix inputs are not the ones you allowed "
        f"on this host (changed: {shown}), and the guest can edit them. Review them, then run "
        f"'agentvm-supervise allow --work-dir {work_dir}'; the VM starts with the previous dev shell"
    )


def allow(work_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """Record the current inputs of `work_dir` as allowed; returns them."""
    current = inputs(work_dir)
    if "" in current:
        raise SupervisorError(
            f"{work_dir} has more than {MAX_FILES} files and dirs outside hidden dirs and node_modules: "
            "too many to tell whether its Nix code changed; leave DIRENV_ALLOW unset for it"
        )
    path = _record_path(work_dir, env)
    temporary = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as record:
            record.write(msgspec.json.encode(current))
        temporary.replace(path)
    except OSError as exc:
        raise SupervisorError(
            f"cannot record the allowed dev shell in {path.parent} ({exc.strerror}): make it writable, "
            "or set XDG_STATE_HOME to a writable dir",
            exit_code=ExitCode.CANT_CREATE,
        ) from None
    return current
