"""A fake Anthropic Messages API for agent turns in tests: streams SSE as the real API does.

The script is one turn of tool use: the first request that offers a tool named `tool` gets a
`tool_use` block calling it with `tool_input`; a request that carries a `tool_result` (the CLI ran
the tool) gets a short text and `end_turn`. Every other request (the CLI's side requests: titles,
topic checks, token counts) gets a plain text answer. Listens on 127.0.0.1 only; the guest reaches
it through QEMU's user-mode NAT as 10.0.2.2.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    tool: str
    tool_input: dict[str, Any]
    final_text: str = "Done."
    requests: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: int = 0
    tool_results: list[Any] = field(default_factory=list)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _has_tool_result(body: dict[str, Any]) -> list[Any]:
    found = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, list):
            found += [
                block for block in content if isinstance(block, dict) and block.get("type") == "tool_result"
            ]
    return found


def _stream(model: str, blocks: list[dict[str, Any]], stop_reason: str) -> Iterator[bytes]:
    usage = {"input_tokens": 10, "output_tokens": 0}
    yield _sse(
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": usage,
            },
        },
    )
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            yield _sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            yield _sse(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
            )
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
    yield _sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": 5},
        },
    )
    yield _sse("message_stop", {"type": "message_stop"})


def _handler(script: Script, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._json({"data": [], "has_more": False})

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                body = {}
            with lock:
                script.requests.append(
                    {"path": self.path, "body": body, "api_key": self.headers.get("x-api-key")}
                )
            if "count_tokens" in self.path:
                self._json({"input_tokens": 10})
                return
            model = str(body.get("model", "claude-fake"))
            tools = {tool.get("name") for tool in body.get("tools", []) if isinstance(tool, dict)}
            results = _has_tool_result(body)
            blocks: list[dict[str, Any]]
            if results:
                with lock:
                    script.tool_results += results
                blocks, stop = [{"type": "text", "text": script.final_text}], "end_turn"
            elif script.tool in tools:
                with lock:
                    script.tool_calls += 1
                call: dict[str, Any] = {
                    "type": "tool_use",
                    "id": "toolu_fake1",
                    "name": script.tool,
                    "input": script.tool_input,
                }
                blocks, stop = [call], "tool_use"
            else:
                blocks, stop = [{"type": "text", "text": "ok"}], "end_turn"
            if not body.get("stream"):
                content = [
                    {"type": "text", "text": b["text"]}
                    if b["type"] == "text"
                    else {"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]}
                    for b in blocks
                ]
                self._json(
                    {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": content,
                        "stop_reason": stop,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 10, "output_tokens": 5},
                    }
                )
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            for chunk in _stream(model, blocks, stop):
                self.wfile.write(chunk)
                self.wfile.flush()

        def _json(self, data: dict[str, Any]) -> None:
            payload = json.dumps(data).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@contextmanager
def serve(script: Script, host: str = "127.0.0.1") -> Iterator[int]:
    """Serve `script` on `host` (a loopback address); yields the port."""
    server = ThreadingHTTPServer((host, 0), _handler(script, threading.Lock()))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def claude_write_turn(base_url: str) -> list[str]:
    """The guest command of the tests' agent turns: `claude -p` against the fake API at `base_url`,
    allowed only the Write tool, with its side traffic (telemetry, updates) off."""
    return [
        "env", f"ANTHROPIC_BASE_URL={base_url}",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1", "DISABLE_AUTOUPDATER=1",
        "claude", "-p", "Write hello.txt", "--allowedTools", "Write",
    ]  # fmt: skip
