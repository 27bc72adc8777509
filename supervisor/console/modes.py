"""Terminal modes the guest turned on, so leaving a terminal can undo them and attaching redo them.

A TUI in the guest switches the user's terminal into modes that outlive it: the alternate screen,
mouse and focus reporting, bracketed paste, application cursor keys, the kitty keyboard protocol,
synchronized output, a scroll region. Detaching (or the VM dying) in such a state leaves the user's
shell receiving `^[[I` on focus and mouse garbage on every click. `TerminalModes` is handed each
escape sequence of the output by the filter's parser (filter.OutputFilter's `on_sequence`, which
parses as the terminal does) and gives the bytes that undo what is on, and the bytes that bring a
fresh terminal into the same modes before and after a replay. It only looks; it changes nothing.
"""

from __future__ import annotations

import re

# DEC private modes that are off in a fresh terminal and that matter to the user once a guest
# turned them on: cursor keys, origin mode, mouse (X10, VT200, highlight, button, any, UTF-8, SGR,
# urxvt, SGR-pixels), focus, alternate scroll, keypad, bracketed paste, synchronized output.
_OFF_BY_DEFAULT = (1, 6, 9, 66, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1015, 1016, 2004, 2026)
_ON_BY_DEFAULT = (7, 25)  # autowrap, cursor visible
_ALT_SCREENS = (1049, 1047, 47)

_SEQUENCES = re.compile(
    rb"\x1b\[\?([0-9;]*)([hl])"  # DECSET / DECRST
    rb"|\x1b([=>])"  # keypad application / numeric
    rb"|\x1b\[([<>])([0-9;]*)u"  # kitty keyboard protocol: push flags / pop N
    rb"|\x1b\[>4(?:;([0-9]*))?m"  # xterm modifyOtherKeys
    rb"|\x1b\[([0-9]*)(?:;[0-9]*)?r"  # scroll region (DECSTBM)
    rb"|\x1b\[4([hl])"  # insert mode (IRM)
)


class TerminalModes:
    def __init__(self) -> None:
        self._private: dict[int, bool] = {}
        self._alt_screen: int | None = None  # which of 1049/1047/47 is on
        self._keypad = False
        self._kitty: list[bytes] = []  # pushed flag sets, oldest first
        self._modify_other_keys: bytes | None = None
        self._scroll_region = False
        self._insert = False
        self.changes = 0  # counts the sequences seen: a cheap "did anything change?"

    def sequence(self, sequence: bytes) -> None:
        """One complete escape sequence (the filter hands them over one by one)."""
        match = _SEQUENCES.fullmatch(sequence)
        if match is not None:
            self._apply(match)

    def _apply(self, match: re.Match[bytes]) -> None:
        self.changes += 1
        params, action, keypad, kitty, kitty_params, other_keys, _region, insert = match.groups()
        if action is not None:
            on = action == b"h"
            for param in params.split(b";"):
                if param.isdigit():
                    mode = int(param)
                    if mode in _ALT_SCREENS:
                        self._alt_screen = mode if on else None
                    else:
                        self._private[mode] = on
        elif keypad is not None:
            self._keypad = keypad == b"="
        elif kitty is not None:
            if kitty == b">":
                self._kitty.append(kitty_params)
            else:
                count = int(kitty_params) if kitty_params.isdigit() else 1
                del self._kitty[len(self._kitty) - min(count, len(self._kitty)) :]
        elif match.group(0).startswith(b"\x1b[>4"):
            self._modify_other_keys = match.group(0) if other_keys not in (None, b"", b"0") else None
        elif insert is not None:
            self._insert = insert == b"h"
        else:  # CSI r (or CSI ; r) is the whole screen again
            self._scroll_region = match.group(0) not in (b"\x1b[r", b"\x1b[;r")

    def _changed(self) -> tuple[list[int], list[int]]:
        """(modes on that are off by default, modes off that are on by default)"""
        turned_on = [mode for mode in _OFF_BY_DEFAULT if self._private.get(mode)]
        turned_off = [mode for mode in _ON_BY_DEFAULT if self._private.get(mode) is False]
        return turned_on, turned_off

    def undo(self) -> bytes:
        """Bytes that bring the terminal back from every mode the guest left on."""
        out = bytearray()
        if self._alt_screen is not None:
            out += b"\x1b[?%dl" % self._alt_screen
        turned_on, turned_off = self._changed()
        out += b"".join(b"\x1b[?%dl" % mode for mode in turned_on)
        out += b"".join(b"\x1b[?%dh" % mode for mode in turned_off)
        if self._keypad:
            out += b"\x1b>"
        if self._kitty:
            out += b"\x1b[<%du" % len(self._kitty)
        if self._modify_other_keys is not None:
            out += b"\x1b[>4m"
        if self._insert:
            out += b"\x1b[4l"
        if self._scroll_region:
            out += b"\x1b7\x1b[r\x1b8"  # DECSTBM homes the cursor: keep it where it is
        if out:
            out += b"\x1b[0m"
        return bytes(out)

    def before_replay(self) -> bytes:
        """For a fresh terminal: the screen the replay belongs on."""
        return b"\x1b[?%dh" % self._alt_screen if self._alt_screen is not None else b""

    def after_replay(self) -> bytes:
        """For a fresh terminal, after the replay: the input modes the guest expects now."""
        turned_on, turned_off = self._changed()
        out = bytearray()
        out += b"".join(b"\x1b[?%dh" % mode for mode in turned_on if mode != 2026)
        out += b"".join(b"\x1b[?%dl" % mode for mode in turned_off)
        if self._keypad:
            out += b"\x1b="
        out += b"".join(b"\x1b[>%su" % flags for flags in self._kitty)
        if self._modify_other_keys is not None:
            out += self._modify_other_keys
        if self._insert:
            out += b"\x1b[4h"
        return bytes(out)
