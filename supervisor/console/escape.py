"""The escape key: finding it in the user's input, and the one table of what follows it.

The supervisor's own terminal (hub) and an `attach` client (attach) both dispatch through
`EscapeCommands`, so the keys, their help line and their replies cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable

from supervisor.console.settings import MSG, describe_key


class EscapeReader:
    """Finds the escape key in the user's input; returns what goes to the guest."""

    def __init__(self, escape: int | None, on_command: Callable[[str], None]) -> None:
        self._escape = escape
        self._pending = False
        self._on_command = on_command

    def feed(self, data: bytes) -> bytes:
        if self._escape is None:
            return data
        if not self._pending and self._escape not in data:
            return data
        out = bytearray()
        for byte in data:
            if self._pending:
                self._pending = False
                if byte == self._escape:
                    out.append(byte)
                else:
                    self._on_command(chr(byte))
            elif byte == self._escape:
                self._pending = True
            else:
                out.append(byte)
        return bytes(out)


# The one table of escape commands: (key, what it does), in the order the help line lists them.
COMMANDS = ((".", "stop the VM"), ("d", "detach"), ("?", "this help"))


def help_text(escape: int) -> bytes:
    key = describe_key(escape)
    listed = "  |  ".join(f"{command} {what}" for command, what in COMMANDS)
    return f"\r\n[{MSG} console, {key} then:  {listed}  |  {key} send {key} to the guest]\r\n".encode()


class EscapeCommands:
    """What the key after the escape key does, for whichever side holds the terminal.

    `stop` and `detach` are that side's own actions (the supervisor stops its VM; an attach client
    asks the supervisor to); `show` writes a notice to the user's terminal.
    """

    def __init__(
        self,
        escape: int,
        *,
        stop: Callable[[], None],
        detach: Callable[[], None],
        show: Callable[[bytes], None],
    ) -> None:
        self._escape = escape
        self._stop = stop
        self._detach = detach
        self._show = show

    def run(self, key: str) -> None:
        if key == ".":
            self._show(f"\r\n[{MSG}: stopping the VM]\r\n".encode())
            self._stop()
        elif key == "d":
            self._detach()
        elif key == "?":
            self._show(help_text(self._escape))
        else:
            self._show(
                f"\r\n[{MSG}: {describe_key(self._escape)} {key!r} means nothing; ? for help]\r\n".encode()
            )


def escape_reader(
    escape: int | None,
    *,
    stop: Callable[[], None],
    detach: Callable[[], None],
    show: Callable[[bytes], None],
) -> EscapeReader:
    """The input side of a terminal; `escape` None (no terminal, or `escape-key = none`) passes all."""
    if escape is None:
        return EscapeReader(None, _never)
    return EscapeReader(escape, EscapeCommands(escape, stop=stop, detach=detach, show=show).run)


def _never(key: str) -> None:
    raise AssertionError(f"an escape command {key!r} without an escape key")
