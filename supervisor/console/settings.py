"""The console's settings and the escape key's spelling: what planning needs, without PTY code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ESCAPE_DEFAULT = 0x1D  # Ctrl-]
MSG = "agentvm-supervise"  # how the console's own notices begin: [agentvm-supervise: ...]


def parse_escape_key(text: str) -> int | None:
    """'ctrl-]', 'C-]', '^]', a single character, or 'none'; ValueError names the valid forms."""
    lowered = text.strip().lower()
    if lowered == "none":
        return None
    for prefix in ("ctrl-", "c-", "^"):
        if lowered.startswith(prefix) and len(lowered) == len(prefix) + 1:
            code = ord(lowered[-1].upper()) ^ 0x40
            if 0 <= code < 32:
                return code
    if len(text) == 1 and ord(text) < 128:
        return ord(text)
    raise ValueError(
        f"invalid escape key '{text}': use ctrl-X (e.g. ctrl-], ctrl-^), ^X, a single ASCII character, "
        "or none"
    )


def describe_key(code: int) -> str:
    return f"Ctrl-{chr(code ^ 0x40)}" if code < 32 else chr(code)


@dataclass(frozen=True, kw_only=True)
class ConsoleSettings:
    escape: int | None = ESCAPE_DEFAULT
    filter: bool = True
    replay_bytes: int = 64 << 10
    log_dir: Path | None = None  # None: no console log
    log_max_bytes: int = 4 << 20
    log_keep: int = 20
