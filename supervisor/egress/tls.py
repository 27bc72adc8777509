"""The server name (SNI) of a TLS ClientHello, read from the first bytes of a CONNECT tunnel.

Only what the check needs: the handshake may span several TLS records (post-quantum key shares
make ClientHellos of 1.5 KiB and more), so records are joined until the ClientHello is whole.
`parse_client_hello` never raises on bad input: it says "need more", "not TLS" or the name.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 64 * 1024  # a ClientHello bigger than this is not one we wait for
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000


@dataclass(frozen=True)
class Hello:
    complete: bool  # False: read more bytes and ask again
    is_tls: bool = True
    server_name: str | None = None  # None: a ClientHello without SNI


NEED_MORE = Hello(complete=False)
NOT_TLS = Hello(complete=True, is_tls=False)


def _handshake_bytes(data: bytes) -> tuple[bytes, bool] | None:
    """The concatenated payload of the leading handshake records, and whether a record is cut off."""
    payload = bytearray()
    offset = 0
    while offset + 5 <= len(data):
        kind, major, length = data[offset], data[offset + 1], int.from_bytes(data[offset + 3 : offset + 5])
        if kind != _HANDSHAKE or major != 3 or length == 0 or length > 16384 + 2048:
            return None if offset == 0 else (bytes(payload), False)
        if offset + 5 + length > len(data):
            payload += data[offset + 5 :]
            return bytes(payload), True
        payload += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
    return bytes(payload), offset < len(data)


def parse_client_hello(data: bytes) -> Hello:
    if not data:
        return NEED_MORE
    if data[0] != _HANDSHAKE:
        return NOT_TLS
    if len(data) < 5:
        return NEED_MORE
    joined = _handshake_bytes(data)
    if joined is None:
        return NOT_TLS
    body, _cut = joined
    if len(body) < 4:
        return NEED_MORE if len(data) < MAX_HELLO else NOT_TLS
    if body[0] != _CLIENT_HELLO:
        return NOT_TLS
    length = int.from_bytes(body[1:4])
    if length > MAX_HELLO:
        return NOT_TLS
    if len(body) < 4 + length:
        return NEED_MORE
    return _server_name(body[4 : 4 + length])


def _server_name(hello: bytes) -> Hello:
    """Walk version, random, session id, cipher suites, compression, then the extensions."""
    try:
        offset = 2 + 32
        offset += 1 + hello[offset]  # session id
        offset += 2 + int.from_bytes(hello[offset : offset + 2])  # cipher suites
        offset += 1 + hello[offset]  # compression methods
        if offset >= len(hello):
            return Hello(complete=True)  # no extensions at all
        end = offset + 2 + int.from_bytes(hello[offset : offset + 2])
        offset += 2
        while offset + 4 <= min(end, len(hello)):
            kind = int.from_bytes(hello[offset : offset + 2])
            size = int.from_bytes(hello[offset + 2 : offset + 4])
            data = hello[offset + 4 : offset + 4 + size]
            offset += 4 + size
            if kind != _SERVER_NAME:
                continue
            # server_name_list: length(2), then entries type(1) length(2) name
            position = 2
            while position + 3 <= len(data):
                name_type = data[position]
                name_len = int.from_bytes(data[position + 1 : position + 3])
                name = data[position + 3 : position + 3 + name_len]
                position += 3 + name_len
                if name_type == 0:
                    return Hello(complete=True, server_name=name.decode("ascii", "replace").lower())
            return NOT_TLS  # an SNI extension without a host name: malformed
    except IndexError:
        return NOT_TLS
    return Hello(complete=True)
