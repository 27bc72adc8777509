"""The hostile-output filter: what the guest prints may not reach beyond the user's pane.

The guest is untrusted, and its console output goes straight to the user's terminal. Terminals
obey sequences that act outside the pane (OSC 52 writes the clipboard, OSC 50 changes the font,
`CSI 8 t` resizes the window, DCS strings carry tmux passthrough and DECRQSS) and queries whose
answers the terminal *types* into its input: if the answer carries text the guest chose (the title
report `CSI 21 t` after the guest set the title to a command and a newline) and arrives after the
supervisor exited, the host shell runs it.

`OutputFilter` is a streaming parser modelled on the VT500 state machine (vt100.net/emu/dec_ansi_parser)
for a UTF-8 terminal. Its invariant: it emits only valid UTF-8 text, C0 controls, and *complete*
escape sequences that the policy below allows; everything else is dropped. An emitted sequence
leaves the terminal in its ground state, so nothing dropped can make the bytes around it into a
new sequence. Sequences split across reads are held (bounded), a partial one at the end of the
stream is dropped, and an overlong one is dropped whole.

Policy (README "Console" documents it for users):
  * dropped: every DCS, SOS, PM and APC string (DECRQSS, XTGETTCAP, sixel, tmux passthrough, kitty
    graphics); every OSC but titles (0-2), palette and dynamic colors (4, 5, 10-19, 104, 105,
    110-119), hyperlinks (8) and shell marks (133) - so OSC 52, 50, 7, 9, 777, 1337 go;
    `CSI Ps t` window operations and reports except the size reports (14, 15, 16, 18, 19) and the
    title stack (22, 23); DA3 (`CSI = c`, unit id) and XTVERSION (`CSI > q`), which identify the
    host's terminal; media copy (`CSI i`); `ESC %` (leaving UTF-8); every C1 control in its UTF-8
    form (U+0080-U+009F), with the sequence it introduces.
  * kept, although they make the terminal answer: DA1/DA2 (`CSI c`, `CSI > c`), DSR/CPR (`CSI n`),
    DECRQM (`CSI $ p`), size reports, color queries (`OSC 11;?`), the kitty keyboard query. Their
    answers have a fixed form with nothing the guest chose in it (no newline can be smuggled in),
    they go back to the guest that asked, and TUIs rely on them (DA1 as the end marker of their
    probes, CPR for the cursor, OSC 11 to pick a light or dark theme): dropping them makes TUIs
    hang on a timeout.
Invalid UTF-8 becomes U+FFFD, as the terminal would show it.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from typing import Final

ESC = 0x1B
BEL = 0x07
CAN = 0x18
SUB = 0x1A
DEL = 0x7F

MAX_CSI = 256  # bytes of one CSI sequence; longer ones are dropped whole
MAX_ESC_INTERMEDIATES = 16
MAX_OSC = 4096  # bytes of one OSC sequence we would pass on (OSC 8 URIs are <= 2083 in VTE)

OSC_ALLOWED = frozenset(
    {0, 1, 2, 4, 5, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 104, 105, 133} | set(range(110, 120))
)
WINDOW_OPS_ALLOWED = frozenset({14, 15, 16, 18, 19, 22, 23})

# States. Strings (DCS/SOS/PM/APC, a refused or overlong OSC) are only ever dropped.
_GROUND, _ESCAPE, _ESCAPE_IGNORE, _CSI, _CSI_IGNORE, _OSC, _OSC_ESC, _DROP, _DROP_ESC = range(9)

_GROUND_SPECIAL = re.compile(rb"\x1b|\xc2[\x80-\x9f]")
# The fast path: the regex delimits a run of bytes other than ESC and C2 (C2 80..9F are the C1
# controls), C2 A0..BF, and CSI sequences without a private marker whose final byte no rule refuses
# (not c i q t) and that switch no mode (not h l r u), bounded exactly as the byte-by-byte path
# bounds them; the C UTF-8 decoder then checks the run. Both paths decide every input the same way,
# which the split property test checks. Sequences that switch modes take the exact path, which
# hands every sequence it passes on to `on_sequence` (the console's TerminalModes). (No possessive
# quantifiers: CPython 3.11.2's `re` lets a nested `++` match an incomplete CSI.)
# supervisor/console/_scan.c does the same in one loop when it is built; this is its contract.
_SAFE_RUN = re.compile(
    rb"(?:[\x00-\x1a\x1c-\xc1\xc3-\xff]+|\xc2[\xa0-\xbf]"
    rb"|\x1b\[[0-9:;]{0,250}[\x20-\x2f]{0,4}[\x40-\x62\x64-\x67\x6a\x6b\x6d-\x70\x73\x76-\x7e])+"
)
# Fast paths: a complete CSI or OSC within one read, matched in C instead of byte by byte.
_CSI_WHOLE = re.compile(rb"\x1b\[([\x30-\x3f]{0,250})([\x20-\x2f]{0,4})([\x40-\x7e])")
_OSC_WHOLE = re.compile(rb"\x1b\]([^\x07\x18\x1a\x1b\xc2]{0,4000})(\x07|\x1b\\)")
_CSI_FORM = re.compile(rb"([<=>?]?)([0-9:;]*)([\x20-\x2f]*)([\x40-\x7e])")
_OSC_FORM = re.compile(rb"([0-9]{1,5})(?:;(.*))?", re.DOTALL)
_DROP_END = re.compile(rb"[\x07\x18\x1a\x1b\xc2]")  # candidates only; each is checked
# What a read may end with that is held over to the next one (in ground): the start of a CSI or OSC
# that `_SAFE_RUN`, `_CSI_WHOLE` or `_OSC_WHOLE` could still match. The byte-by-byte path would emit
# nothing for these bytes either (none acts at once, and they are within the bounds) and would be
# left in the state that they, read again from ground, lead to: holding them changes no output, and
# lets the next read take them on the fast path, whole.
_HELD = re.compile(
    rb"\x1b(?:"
    rb"\[[\x30-\x3f]{0,250}[\x20-\x2f]{0,4}"  # CSI: parameters and intermediates, no final yet
    rb"|\][^\x07\x18\x1a\x1b\xc2]{0,4000}\x1b?"  # OSC: its payload, and maybe the ESC of ST
    rb")?\Z"
)

SafeRunEnd = Callable[[bytes, int], int]


def safe_run_end_re(data: bytes, pos: int) -> int:
    """Where the longest run from `pos` that is certainly safe to pass on ends (the fast path)."""
    run = _SAFE_RUN.match(data, pos)
    if run is None:
        return pos
    try:
        _, used = codecs.utf_8_decode(data[pos : run.end()], "strict", False)
    except UnicodeDecodeError as exc:
        used = exc.start  # the invalid bytes are _ground's business
    return pos + used


def _incomplete_character(tail: bytes) -> bool:
    """Whether the next read may complete `tail` into a character (as `_ground`'s decoder sees it)."""
    try:
        return codecs.utf_8_decode(tail, "strict", False)[1] == 0
    except UnicodeDecodeError:
        return False


def _c_safe_run_end() -> SafeRunEnd | None:
    try:
        from supervisor.console._scan import safe_run_end
    except ImportError:  # built without a C compiler: the regex gives the same, ~10x slower
        return None
    return safe_run_end


C_SAFE_RUN_END: Final = _c_safe_run_end()  # None when supervisor/console/_scan.c is not built
FAST_SCAN: Final = C_SAFE_RUN_END is not None
safe_run_end: Final[SafeRunEnd] = C_SAFE_RUN_END or safe_run_end_re


def csi_allowed(body: bytes) -> bool:
    """`body` is what follows ESC [ up to and including the final byte."""
    form = _CSI_FORM.fullmatch(body)
    if form is None:  # a private marker after the parameters etc.: terminals ignore it; so do we
        return False
    private, params, intermediates, final = form.groups()
    if final == b"t" and not private and not intermediates:
        first = params.split(b";", 1)[0].split(b":", 1)[0]
        return first.isdigit() and int(first) in WINDOW_OPS_ALLOWED
    if final == b"c" and private == b"=":  # DA3: the terminal's unit id
        return False
    if final == b"q" and private == b">" and not intermediates:  # XTVERSION: name and version
        return False
    return not (final == b"i" and not intermediates)  # media copy: printer controller mode


def osc_allowed(payload: bytes) -> bool:
    """`payload` is what lies between ESC ] and the terminator."""
    form = _OSC_FORM.fullmatch(payload)
    if form is None or int(form.group(1)) not in OSC_ALLOWED:
        return False
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any("\x80" <= char <= "\x9f" for char in text)


def _esc_allowed(intermediates: bytes, final: int) -> bool:
    if not intermediates and final == 0x5C:  # ST with no string to end: a no-op, left out
        return False
    return not intermediates.startswith(b"%")  # ESC % @ / ESC % G: leave or select UTF-8


class OutputFilter:
    """Feed it the guest's output as it arrives; write what `feed` returns to the terminal.

    `on_sequence`, if given, sees every escape sequence passed on except SGR-like CSIs without a
    private marker: in particular each one that switches a terminal mode (see modes.py). `scan` is
    the fast path (`safe_run_end`: the C one when it is built); the tests pass each implementation.
    """

    def __init__(
        self, on_sequence: Callable[[bytes], None] | None = None, *, scan: SafeRunEnd = safe_run_end
    ) -> None:
        self._on_sequence = on_sequence
        self._scan = scan
        self._state = _GROUND
        # In ground: the end of the last read, to be read again with the next one: an incomplete
        # UTF-8 character, or (starting with ESC) the start of a sequence (`_HELD`).
        self._carry = b""
        self._seq = bytearray()  # the sequence being collected, from its ESC on
        self._seven_bit = True  # introduced by ESC (not by a C1 control): may be passed on
        self._osc = True  # the string being dropped is an OSC (BEL ends it)
        self._c2 = False  # in a string, the last byte was 0xC2: a C1 control may follow

    def feed(self, data: bytes) -> bytes:
        if self._carry:
            data = self._carry + data
            self._carry = b""
        pos, end = 0, len(data)
        if self._state == _GROUND:  # the common cases, without building `out`: one safe run, ended
            # by the end of the read or by a sequence or character that the end of the read cuts
            pos = self._scan(data, 0)
            if pos == end:
                return data
            if self._hold(data, pos):
                return data[:pos]
        out = bytearray(memoryview(data)[:pos])
        while pos < end:
            if self._state == _GROUND:
                stop = self._scan(data, pos)
                out += data[pos:stop]
                pos = self._ground(data, stop, out) if stop < end else end
                continue
            if self._state == _DROP and not self._c2:  # skip a dropped string's body in bulk
                found = _DROP_END.search(data, pos)
                if found is None:
                    break
                pos = found.start()
            pos += self._byte(data[pos], out)
        return bytes(out)

    def flush(self) -> bytes:
        """End of the stream: a partial sequence is dropped, a partial character shown as U+FFFD."""
        out = b"\xef\xbf\xbd" if self._carry and self._carry[0] != ESC else b""
        self._state = _GROUND
        self._carry = b""
        self._seq = bytearray()
        self._c2 = False
        return out

    # ---- ground: text, found in bulk ---------------------------------------------------------

    def _hold(self, data: bytes, pos: int) -> bool:
        """Carry the rest of the read over to the next one if it is cut off there: the start of a
        sequence (`_HELD`) or of a UTF-8 character (what `_ground` would carry)."""
        if data[pos] == ESC:
            held = _HELD.match(data, pos) is not None
        else:
            held = len(data) - pos < 4 and _incomplete_character(data[pos:])
        if held:
            self._carry = data[pos:]
        return held

    def _ground(self, data: bytes, pos: int, out: bytearray) -> int:
        if data[pos] == ESC:  # where most safe runs end
            return self._escape_fast(data, pos, out)
        special = _GROUND_SPECIAL.search(data, pos)
        stop = special.start() if special else len(data)
        if stop > pos:
            segment = data[pos:stop]
            if segment.isascii():
                out += segment
            else:
                text, used = codecs.utf_8_decode(segment, "replace", special is not None)
                out += text.encode()
                if used < len(segment):
                    self._carry = segment[used:]  # at most 3 bytes, completed by the next read
        if special is None:
            return len(data)
        if data[stop] == ESC:
            return self._escape_fast(data, stop, out)
        self._c1(data[stop + 1])
        return stop + 2

    def _escape_fast(self, data: bytes, pos: int, out: bytearray) -> int:
        """At an ESC: a whole CSI or OSC is decided at once; anything else goes byte by byte."""
        csi = _CSI_WHOLE.match(data, pos)
        if csi is not None:
            if csi_allowed(data[pos + 2 : csi.end()]):
                self._emit(data[pos : csi.end()], out)
            return csi.end()
        osc = _OSC_WHOLE.match(data, pos)
        if osc is not None:
            if osc_allowed(osc.group(1)):
                out += data[pos : osc.end()]
            return osc.end()
        if self._hold(data, pos):
            return len(data)
        self._start(_ESCAPE, seven_bit=True)
        return pos + 1

    # ---- sequences, byte by byte; each returns 0 when the byte must be read again ----------

    def _start(self, state: int, *, seven_bit: bool, osc: bool = False) -> None:
        self._state = state
        self._seven_bit = seven_bit
        self._osc = osc
        self._seq = bytearray(b"\x1b") if seven_bit else bytearray()
        self._c2 = False

    def _c1(self, code: int) -> None:
        """A C1 control in its UTF-8 form (C2 80..C2 9F): dropped, and so is what it introduces."""
        if code == 0x9B:
            self._start(_CSI, seven_bit=False)
        elif code == 0x9D:
            self._start(_DROP, seven_bit=False, osc=True)
        elif code in (0x90, 0x98, 0x9E, 0x9F):
            self._start(_DROP, seven_bit=False)
        else:
            self._state = _GROUND

    def _cut(self, byte: int, out: bytearray) -> int:
        """The sequence is cut off by `byte` (ESC, CAN, SUB or a non-ASCII byte): it is dropped."""
        if byte == ESC:
            self._start(_ESCAPE, seven_bit=True)
            return 1
        self._state = _GROUND
        if byte in (CAN, SUB):
            out.append(byte)
            return 1
        return 0  # read again in ground (a UTF-8 character, or a C1 control)

    def _byte(self, byte: int, out: bytearray) -> int:
        state = self._state
        if state in (_ESCAPE, _ESCAPE_IGNORE, _CSI, _CSI_IGNORE):
            return self._control_sequence_byte(byte, out)
        if state in (_OSC, _OSC_ESC):
            return self._osc_byte(byte, out)
        return self._drop_byte(byte, out)

    def _control_sequence_byte(self, byte: int, out: bytearray) -> int:
        state = self._state
        if byte in (ESC, CAN, SUB) or byte >= 0x80:
            return self._cut(byte, out)
        if byte < 0x20:  # other C0 controls act at once, even inside a sequence (VT500 "execute")
            out.append(byte)
            return 1
        if byte == DEL:
            return 1
        if state in (_ESCAPE, _ESCAPE_IGNORE):
            if byte < 0x30:  # an intermediate
                if state == _ESCAPE:
                    self._seq.append(byte)
                    if len(self._seq) > MAX_ESC_INTERMEDIATES:
                        self._state = _ESCAPE_IGNORE
                return 1
            self._state = _GROUND
            if state == _ESCAPE_IGNORE:
                return 1
            if len(self._seq) == 1:
                if byte == 0x5B:  # [
                    self._state = _CSI
                    self._seq.append(byte)
                    return 1
                if byte == 0x5D:  # ]
                    self._state = _OSC
                    self._seq.append(byte)
                    return 1
                if byte in (0x50, 0x58, 0x5E, 0x5F):  # P X ^ _: DCS SOS PM APC
                    self._start(_DROP, seven_bit=True)
                    return 1
            if _esc_allowed(bytes(self._seq[1:]), byte):
                self._seq.append(byte)
                self._emit(bytes(self._seq), out)
            return 1
        # CSI: parameters and intermediates (0x20-0x3f), then a final byte (0x40-0x7e)
        if byte < 0x40:
            if state == _CSI:
                self._seq.append(byte)
                if len(self._seq) > MAX_CSI:
                    self._state = _CSI_IGNORE
            return 1
        self._state = _GROUND
        if state == _CSI and self._seven_bit:
            self._seq.append(byte)
            if csi_allowed(bytes(self._seq[2:])):
                self._emit(bytes(self._seq), out)
        return 1

    def _emit(self, sequence: bytes, out: bytearray) -> None:
        out += sequence
        if self._on_sequence is not None:
            self._on_sequence(sequence)

    def _osc_byte(self, byte: int, out: bytearray) -> int:
        if self._c2:
            self._c2 = False
            if 0x80 <= byte <= 0x9F:  # a C1 control ends the string (ST, 0x9c, included)
                self._c1(byte)
                return 1
            self._seq.append(0xC2)
        if self._state == _OSC_ESC:
            if byte == 0x5C:  # ESC \ is ST
                self._state = _GROUND
                if osc_allowed(bytes(self._seq[2:])):
                    out += self._seq
                    out += b"\x1b\\"
                return 1
            self._start(_ESCAPE, seven_bit=True)  # that ESC began a new sequence; the OSC is dropped
            return 0
        if byte == BEL:
            self._state = _GROUND
            if osc_allowed(bytes(self._seq[2:])):
                out += self._seq
                out.append(BEL)
            return 1
        if byte == ESC:
            self._state = _OSC_ESC
        elif byte in (CAN, SUB):
            return self._cut(byte, out)
        elif byte == 0xC2:
            self._c2 = True
        else:
            self._seq.append(byte)
            if len(self._seq) > MAX_OSC:
                self._start(_DROP, seven_bit=True, osc=True)
        return 1

    def _drop_byte(self, byte: int, out: bytearray) -> int:
        if self._c2:
            self._c2 = False
            if 0x80 <= byte <= 0x9F:
                self._c1(byte)
                return 1
        if self._state == _DROP_ESC:
            if byte == 0x5C:
                self._state = _GROUND
                return 1
            self._start(_ESCAPE, seven_bit=True)
            return 0
        if byte == ESC:
            self._state = _DROP_ESC
        elif byte in (CAN, SUB):
            return self._cut(byte, out)
        elif byte == BEL and self._osc:
            self._state = _GROUND
        elif byte == 0xC2:
            self._c2 = True
        return 1
