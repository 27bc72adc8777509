"""What the CLI prints with --json, as msgspec Structs, and the JSON Schema published from them.

`status --json` is control.InstanceStatus, `doctor --json` doctor.Report, `list --json`
InstanceList, `stop --json` StopResult; the control socket speaks control.Request and
control.Response. `agentvm-supervise schema` prints the schema of all of them (docs/schema.json is
that output, and a test keeps it current). Fields are only ever added within a protocol version.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from supervisor import control, doctor

SCHEMA_ID = "https://agentvm-supervise.invalid/schema/v1.json"


class ListedInstance(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    phase: control.Phase | Literal["unknown"]  # unknown: starting, ending, or not answering
    supervisor_pid: int
    created: float  # Unix time
    work_dir: str | None
    runtime_dir: str


class InstanceList(msgspec.Struct, frozen=True, kw_only=True):
    instances: list[ListedInstance]  # live ones, oldest first
    stale_cleaned: list[str]  # instances whose supervisor had died, cleaned up by this call


class StopResult(msgspec.Struct, frozen=True, kw_only=True):
    instance: str
    stopped: bool  # its supervisor has exited (false with --no-wait)
    status: control.InstanceStatus  # as the supervisor answered the stop request


OUTPUTS: dict[str, Any] = {
    "status --json": control.InstanceStatus,
    "list --json": InstanceList,
    "stop --json": StopResult,
    "doctor --json": doctor.Report,
    "control request": control.Request,
    "control response": control.Response,
}


def schema() -> dict[str, Any]:
    """One JSON Schema (2020-12) document: every output under `$defs`, and which is which."""
    refs, definitions = msgspec.json.schema_components(list(OUTPUTS.values()), ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"agentvm-supervise JSON outputs and control protocol (version {control.PROTOCOL_VERSION})",
        "anyOf": refs,
        "x-outputs": dict(zip(OUTPUTS, refs, strict=True)),
        "$defs": definitions,
    }


def render(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode() + "\n"
