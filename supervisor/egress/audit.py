"""The per-instance egress log: one JSON line per guest connection, and the counts `status` shows.

The log lives next to the console logs ($XDG_STATE_HOME/agentvm-supervise/egress/INSTANCE.jsonl,
0600 in a 0700 dir), outside the runtime dir, so a denied host can still be looked up after the VM
is gone: `grep '"denied"' ~/.local/state/agentvm-supervise/egress/*.jsonl`. It is rotated once at
MAX_BYTES (to .1), and only the newest KEEP instances' logs are kept.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog

from supervisor import xdg

MAX_BYTES = 16 << 20
KEEP = 20


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One connection, as the log and the `egress` log event carry it."""

    ts: float  # Unix time of the connection's start
    kind: str  # "CONNECT", an HTTP method, or "-" when no request was read
    host: str = ""
    port: int = 0
    verdict: str = "error"  # allowed | denied | error
    rule: str = ""  # the rule that allowed or denied it, or what went wrong (e.g. "sni-mismatch")
    reason: str = ""
    address: str = ""  # the upstream address connected to
    sni: str | None = None
    bytes_up: int = 0  # guest -> internet
    bytes_down: int = 0  # internet -> guest
    duration_ms: float = 0.0


@dataclass
class Stats:
    connections: int = 0
    active: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    busy: int = 0  # refused because the connection limit was reached
    bytes_up: int = 0
    bytes_down: int = 0
    denied_hosts: Counter[str] = field(default_factory=Counter)


def default_dir(env: dict[str, str] | os._Environ[str]) -> Path:
    return xdg.base("XDG_STATE_HOME", env) / xdg.APP / "egress"


class Audit:
    """Writes records and keeps the counts. `path` None: counts only (tests, bench)."""

    def __init__(self, path: Path | None, *, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.stats = Stats()
        self._max_bytes = max_bytes
        self._fd: int | None = None
        self._size = 0
        self._warned: set[str] = set()
        self._log = structlog.get_logger()
        if path is not None:
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._open()
                _prune(path.parent, keep=KEEP, current=path)
            except OSError as exc:  # the proxy still runs: counts, and the `egress` log events
                self._log.warning(
                    "the egress log cannot be written; connections are logged as events only",
                    path=str(path),
                    reason=exc.strerror or str(exc),
                    remedy="make $XDG_STATE_HOME (~/.local/state) writable",
                )
                self.path = None

    def _open(self) -> None:
        assert self.path is not None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    def record(self, record: Record) -> None:
        stats = self.stats
        stats.bytes_up += record.bytes_up
        stats.bytes_down += record.bytes_down
        if record.verdict == "allowed":
            stats.allowed += 1
        elif record.verdict == "denied":
            stats.denied += 1
            stats.denied_hosts[f"{record.host}:{record.port}"] += 1
        else:
            stats.errors += 1
        self._log.info("egress", **msgspec.structs.asdict(record))
        key = f"{record.host}:{record.port}"
        if record.verdict == "denied" and key not in self._warned and len(self._warned) < 1000:
            self._warned.add(key)  # once per host: enough to notice, not a flood on the console
            self._log.warning("egress denied", host=record.host, port=record.port, why=record.reason)
        self._write(msgspec.json.encode(record) + b"\n")

    def _write(self, line: bytes) -> None:
        if self._fd is None or self.path is None:
            return
        try:
            if self._size + len(line) > self._max_bytes:
                os.close(self._fd)
                self._fd = None
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                self._open()
            if self._fd is not None:
                os.write(self._fd, line)
            self._size += len(line)
        except OSError as exc:  # a full disk must not break the guest's connections
            self._log.warning("egress log write failed; logging stops", path=str(self.path), reason=str(exc))
            self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _prune(directory: Path, *, keep: int, current: Path) -> None:
    logs = sorted(
        (p for p in directory.glob("*.jsonl") if p != current),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in logs[max(keep - 1, 0) :]:
        for path in (old, old.with_name(old.name + ".1")):
            with contextlib.suppress(OSError):
                path.unlink()
