"""The wire format of console.sock, between the supervisor and `agentvm-supervise attach`.

A stream of frames: one byte of kind, four bytes of big-endian length, the payload. Terminal bytes
travel as they are (OUTPUT, INPUT); the few control messages are msgspec JSON. The client speaks
first (HELLO, with the protocol version and its terminal size); the server answers WELCOME, then
the replay and the live output as OUTPUT frames. A NOTICE with `end` set is the server's last frame.
"""

from __future__ import annotations

import enum
import struct
from typing import TypeVar

import msgspec

VERSION = 1
MAX_PAYLOAD = 1 << 20
_HEADER = struct.Struct("!BI")
T = TypeVar("T")


class Kind(enum.IntEnum):
    HELLO = ord("H")  # client: Hello
    INPUT = ord("I")  # client: bytes for the guest
    RESIZE = ord("R")  # client: Size
    STOP = ord("S")  # client: the escape key's "." (graceful stop of the VM)
    WELCOME = ord("W")  # server: Welcome
    OUTPUT = ord("O")  # server: bytes for the terminal
    NOTICE = ord("N")  # server: Notice


class Hello(msgspec.Struct, frozen=True):
    version: int
    pid: int
    rows: int | None = None
    cols: int | None = None


class Welcome(msgspec.Struct, frozen=True):
    version: int
    instance: str


class Size(msgspec.Struct, frozen=True):
    rows: int
    cols: int


class Notice(msgspec.Struct, frozen=True):
    text: str
    end: bool = False  # the server closes the connection after this frame


class ProtocolError(Exception):
    pass


def frame(kind: Kind, payload: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def message(kind: Kind, value: msgspec.Struct) -> bytes:
    return frame(kind, msgspec.json.encode(value))


def decode(payload: bytes, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(payload, type=kind)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"bad {kind.__name__} message: {exc}") from None


class FrameReader:
    """Splits a byte stream into (kind, payload) frames; refuses unknown kinds and oversized ones."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, bytes]]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            code, length = _HEADER.unpack_from(self._buffer)
            try:
                kind = Kind(code)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {code:#x}") from None
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes (the limit is {MAX_PAYLOAD})")
            if len(self._buffer) < _HEADER.size + length:
                break
            frames.append((kind, bytes(self._buffer[_HEADER.size : _HEADER.size + length])))
            del self._buffer[: _HEADER.size + length]
        return frames
