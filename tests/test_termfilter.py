"""The hostile-output filter: properties over arbitrary byte streams (hypothesis), and examples.

The safety oracle is written independently of the filter's state machine: it tokenizes the whole
output at once with one regular expression and checks every escape sequence in it against the
policy in supervisor/console/filter.py's docstring. Tests that take the `scan` fixture (conftest) run
with each implementation of the fast path: supervisor/console/_scan.c and the regex it replaces.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from supervisor.console import filter as termfilter
from supervisor.console.filter import OutputFilter, SafeRunEnd, safe_run_end_re

# ---- the oracle ----------------------------------------------------------------------------------

_TOKENS = re.compile(
    r"""
      \x1b\[ (?P<csi> [\x30-\x3f]* [\x20-\x2f]* [\x40-\x7e] )
    | \x1b\] (?P<osc> [^\x07\x1b\x18\x1a]* ) (?: \x07 | \x1b\\ )
    | \x1b   (?P<esc> [\x20-\x2f]* [\x30-\x7e] )
    | (?P<bad> \x1b | [\x80-\x9f] )
    """,
    re.VERBOSE,
)
_OSC_OK = {0, 1, 2, 4, 5, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 104, 105, 133, *range(110, 120)}
_T_OK = {14, 15, 16, 18, 19, 22, 23}


def dangerous(output: bytes) -> list[str]:
    """Every sequence in `output` the terminal must never see; [] when the output is safe."""
    try:
        text = output.decode("utf-8")  # the filter's output is always valid UTF-8
    except UnicodeDecodeError as exc:
        return [f"invalid UTF-8: {exc}"]
    found = []
    for token in _TOKENS.finditer(text):
        kind, body = token.lastgroup, token.group(token.lastgroup or 0)
        if kind == "bad":
            found.append(f"lone or C1 control {body!r}")
        elif kind == "esc":
            if body in ("[", "]", "P", "X", "^", "_") or body.startswith("%"):
                found.append(f"ESC {body!r}")
        elif kind == "osc":
            number = re.match(r"(\d+)(;|$)", body, re.DOTALL)
            if number is None or int(number.group(1)) not in _OSC_OK:
                found.append(f"OSC {body[:20]!r}")
        elif kind == "csi":
            form = re.fullmatch(r"([<=>?]?)([0-9:;]*)([\x20-\x2f]*)(.)", body)
            if form is None:
                found.append(f"malformed CSI {body!r}")
                continue
            private, params, intermediates, final = form.groups()
            first = re.split("[;:]", params)[0]
            if (
                final == "t"
                and not private
                and not intermediates
                and not (first.isdigit() and int(first) in _T_OK)
            ):
                found.append(f"window op CSI {body!r}")
            if (private, final) in (("=", "c"), (">", "q")) and not intermediates:
                found.append(f"terminal identification CSI {body!r}")
            if final == "i" and not intermediates:
                found.append(f"media copy CSI {body!r}")
    return found


def run(chunks: list[bytes], scan: SafeRunEnd) -> bytes:
    f = OutputFilter(scan=scan)
    return b"".join(f.feed(chunk) for chunk in chunks) + f.flush()


# ---- strategies ----------------------------------------------------------------------------------

# Fragments that make the interesting cases likely: introducers, terminators, C1 in UTF-8 and raw,
# parameters, whole dangerous sequences, UTF-8 with continuation bytes in 0x80-0x9f.
_FRAGMENTS = [
    b"\x1b", b"[", b"]", b"P", b"X", b"^", b"_", b"\\", b"\x07", b"\x18", b"\x1a", b"\x7f", b";",
    b"0", b"1", b"2", b"5", b"8", b"?", b">", b"=", b"<", b"$", b" ", b"%", b"q", b"t", b"c", b"i",
    b"m", b"h", b"l", b"\n", b"\r", b"\t", b"a", b"Z", b"\xc2", b"\x9b", b"\x9c", b"\x9d", b"\x90",
    b"\x98", b"\x9e", b"\x9f", b"\x80", b"\xc3\xa9", b"\xe2\x94\x80", b"\xc5\x9d", b"\xf0\x9f\x98\x80",
    b"\xe2", b"\xed\xa0", b"\xff", b"\x1b]52;c;", b"\x1b]50;", b"\x1b]0;", b"\x1b]8;;", b"\x1b]11;?",
    b"\x1bP", b"\x1b[21t", b"\x1b[8;1;1t", b"\x1b[", b"\x1b]", b"\x1b\\", b"\xc2\x9b", b"\xc2\x9d",
    b"\xc2\x9c", b"\xc2\x90", b"\x1b[>q", b"\x1b[=c", b"\x1b[5i", b"\x1b%G", b"\x1bPtmux;\x1b\x1b]52;c;",
]  # fmt: skip
streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=80).map(b"".join),
    st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.binary(max_size=6)), max_size=60).map(b"".join),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


_plain_text = st.text(
    alphabet=st.characters(
        exclude_categories=["Cs"],
        exclude_characters="\x1b\x18\x1a" + "".join(map(chr, range(0x80, 0xA0))),
    ),
    max_size=40,
)
_ordinary_csi = st.one_of(
    st.lists(st.integers(0, 255), max_size=6).map(lambda ps: "\x1b[" + ";".join(map(str, ps)) + "m"),
    st.builds(lambda n, f: f"\x1b[{n}{f}", st.integers(0, 999), st.sampled_from("ABCDEFGHJKSTXdf@Ln")),
    st.builds(
        lambda n, f: f"\x1b[?{n}{f}",
        st.sampled_from([1, 25, 1049, 2004, 1000, 1006, 2026]),
        st.sampled_from("hl"),
    ),
    st.builds(lambda r, c: f"\x1b[{r};{c}H", st.integers(1, 500), st.integers(1, 500)),
    st.just("\x1b[38;2;10;20;30m"),
    st.just("\x1b[c"),
    st.just("\x1b[6n"),
    st.just("\x1b[18t"),
    st.just("\x1b]0;a title\x07"),
    st.just("\x1b]8;;https://example.com/\x1b\\link\x1b]8;;\x1b\\"),
)


# ---- properties ----------------------------------------------------------------------------------


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams, cuts=st.lists(st.integers(0, 300), max_size=12))
def test_any_split_gives_the_unsplit_output(data: bytes, cuts: list[int], scan: SafeRunEnd) -> None:
    assert run(_split(data, cuts), scan) == run([data], scan)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams, cuts=st.lists(st.integers(0, 300), max_size=12))
def test_no_dangerous_sequence_ever_passes(data: bytes, cuts: list[int], scan: SafeRunEnd) -> None:
    assert dangerous(run(_split(data, cuts), scan)) == []


@settings(max_examples=500)
@given(data=streams, cuts=st.lists(st.integers(0, 300), max_size=6))
def test_bytes_between_each_feed_are_safe_on_their_own(
    data: bytes, cuts: list[int], scan: SafeRunEnd
) -> None:
    """What one read emits is complete: a terminal may render it before the next read arrives."""
    f = OutputFilter(scan=scan)
    for chunk in _split(data, cuts):
        assert dangerous(f.feed(chunk)) == []


@settings(max_examples=500)
@given(data=streams)
def test_a_read_holds_back_only_what_is_unfinished(data: bytes, scan: SafeRunEnd) -> None:
    """CAN cancels a sequence in progress and ends a partial character: only U+FFFD may precede it."""
    f = OutputFilter(scan=scan)
    f.feed(data)
    assert f.feed(b"\x18").replace(b"\xef\xbf\xbd", b"") == b"\x18"


@settings(max_examples=800)
@given(
    pieces=st.lists(st.one_of(_plain_text, _ordinary_csi), max_size=30), cuts=st.lists(st.integers(0, 400))
)
def test_plain_text_and_ordinary_csi_pass_unchanged(
    pieces: list[str], cuts: list[int], scan: SafeRunEnd
) -> None:
    data = "".join(pieces).encode()
    assert run(_split(data, cuts), scan) == data


@settings(max_examples=500)
@given(
    before=_plain_text,
    after=_plain_text,
    hostile=st.sampled_from(
        [
            b"\x1b]52;c;cm0gLXJmIH4K\x07",
            b"\x1b]52;c;?\x1b\\",
            b"\x1b]50;?\x07",
            b"\x1bP$qm\x1b\\",
            b"\x1bP+q544e\x1b\\",
            b"\x1b_Gf=100;AAAA\x1b\\",
            b"\x1b^private\x1b\\",
            b"\x1bXstring\x1b\\",
            b"\x1b[21t",
            b"\x1b[20t",
            b"\x1b[8;100;100t",
            b"\x1b[3;0;0t",
            b"\x1b[>q",
            b"\x1b[=c",
            b"\x1b[5i",
            b"\x1b]1337;File=name=eA==:AAAA\x07",
            b"\x1bPtmux;\x1b\x1b]52;c;eA==\x07\x1b\\",
            b"\xc2\x9d52;c;eA==\xc2\x9c",
            b"\xc2\x9b21t",
            b"\x1b]52;c;" + b"A" * 10000 + b"\x07",
        ]
    ),
    cuts=st.lists(st.integers(0, 10100), max_size=8),
)
def test_a_dangerous_sequence_goes_and_the_text_around_it_stays(
    before: str, after: str, hostile: bytes, cuts: list[int], scan: SafeRunEnd
) -> None:
    data = before.encode() + hostile + after.encode()
    assert run(_split(data, cuts), scan) == before.encode() + after.encode()


# ---- examples ------------------------------------------------------------------------------------


def test_an_overlong_allowed_osc_is_dropped_and_what_follows_shows(scan: SafeRunEnd) -> None:
    assert run([b"\x1b]0;" + b"t" * 5000 + b"\x07after"], scan) == b"after"


def test_an_overlong_csi_is_dropped_whole(scan: SafeRunEnd) -> None:
    assert run([b"\x1b[" + b"1;" * 300 + b"mafter"], scan) == b"after"


def test_a_partial_sequence_at_the_end_is_dropped_and_a_partial_character_shown_as_fffd(
    scan: SafeRunEnd,
) -> None:
    assert run([b"text\x1b]0;unfinished"], scan) == b"text"
    assert run([b"text\x1b["], scan) == b"text"
    assert run([b"text\xe2\x94"], scan) == b"text\xef\xbf\xbd"


def test_a_title_and_a_hyperlink_pass(scan: SafeRunEnd) -> None:
    data = b"\x1b]2;build \xe2\x9c\x93\x07\x1b]8;id=1;https://x.test/\x1b\\x\x1b]8;;\x1b\\"
    assert run([data], scan) == data


def test_a_c0_control_inside_a_csi_acts_first_as_in_the_terminal(scan: SafeRunEnd) -> None:
    assert run([b"\x1b[1\r;2H"], scan) == b"\r\x1b[1;2H"


def test_an_escape_cut_off_by_another_cannot_join_with_what_follows(scan: SafeRunEnd) -> None:
    # ESC, then a DCS that is dropped, then "]52;...": the first ESC must not survive to meet it.
    out = run([b"\x1b\x1bPq\x1b\\]52;c;eA==\x07"], scan)
    assert dangerous(out) == []
    assert out == b"]52;c;eA==\x07"


def test_an_incomplete_csi_after_text_is_held_not_passed(scan: SafeRunEnd) -> None:
    """Regression: with possessive quantifiers, CPython 3.11.2's re matched b"\\x00\\x1b[" whole."""
    f = OutputFilter(scan=scan)
    assert f.feed(b"\x00\x1b[") == b"\x00"
    assert f.feed(b"1m") == b"\x1b[1m"


def test_a_sequence_cut_by_the_end_of_a_read_is_taken_whole_with_the_next(scan: SafeRunEnd) -> None:
    seen: list[bytes] = []
    f = OutputFilter(on_sequence=seen.append, scan=scan)
    assert f.feed(b"ok \x1b[1;3") == b"ok "
    assert f.feed(b"2mgreen") == b"\x1b[1;32mgreen"
    assert seen == []  # the fast path passed it on (the byte-by-byte path reports what it passes)
    assert f.feed(b"\x1b]8;;https://x.test/") == b""
    assert f.feed(b"\x1b") == b""
    assert f.feed(b"\\link") == b"\x1b]8;;https://x.test/\x1b\\link"


@pytest.mark.parametrize(
    "tail",
    [b"\x1b", b"\x1b[", b"\x1b[1;3", b"\x1b[?25", b"\x1b[1 ", b"\x1b]", b"\x1b]0;title", b"\x1b]0;t\x1b"],
)
def test_a_held_partial_sequence_is_dropped_at_the_end_of_the_stream(scan: SafeRunEnd, tail: bytes) -> None:
    f = OutputFilter(scan=scan)
    assert f.feed(b"text" + tail) == b"text"
    assert f.flush() == b""
    assert f.feed(b"m") == b"m"  # and nothing of it is left to join what comes next


# ---- the fast path's scanner ---------------------------------------------------------------------

_FINALS_REFUSED = b"chilqrtu"  # c i q t: refused by some rule; h l r u: mode switches (on_sequence)


@pytest.mark.parametrize(
    ("data", "pos", "end"),
    [
        (b"", 0, 0),
        (b"plain text", 0, 10),
        (b"plain text", 6, 10),
        (b"ab\x1b[1;31mc", 0, 10),
        (b"ab\x1b[1;31mc", 2, 10),
        (b"\x1b[" + b"1" * 250 + b"m.", 0, 254),
        (b"\x1b[" + b"1" * 251 + b"m.", 0, 0),
        (b"\x1b[1" + b" " * 4 + b"m.", 0, 9),
        (b"\x1b[1" + b" " * 5 + b"m.", 0, 0),
        (b"\x1b[1@\x1b[1~", 0, 8),
        *((b"\x1b[1" + bytes([final]), 0, 0) for final in _FINALS_REFUSED),
        (b"\x1b[1\x7f", 0, 0),
        (b"\x1b[?25l", 0, 0),  # a private marker: the exact path's
        (b"\x1b[1<m", 0, 0),
        (b"x\x1b[1;2", 0, 1),  # cut by the end of the data
        (b"x\x1b(B", 0, 1),
        (b"\xc2\xa0\xc2\xbf\xc2\x9b", 0, 4),  # C2 9B is CSI as a C1 control
        (b"x\xc2", 0, 1),
        (b"\xe2\x94\x82\xf0\x9f\x98\x80", 0, 7),
        (b"a\xe2\x94", 0, 1),  # incomplete
        (b"a\xf0\x9f\x98", 0, 1),
        (b"\xed\x9f\xbf!", 0, 4),  # U+D7FF
        (b"\xed\xa0\x80!", 0, 0),  # a surrogate
        (b"\xf4\x8f\xbf\xbf!", 0, 5),  # U+10FFFF
        (b"\xf4\x90\x80\x80!", 0, 0),  # beyond it
        (b"\xe0\x9f\xbf!", 0, 0),  # overlong
        (b"\xf0\x8f\xbf\xbf!", 0, 0),
        (b"\xc1\xbf!", 0, 0),
        (b"a\x80", 0, 1),
        (b"\xf5\x80\x80\x80", 0, 0),
        (b"\xe2\x94\x1b[m", 0, 0),  # a character cut off by an ESC
    ],
)
def test_the_safe_run_ends_where_the_contract_says(scan: SafeRunEnd, data: bytes, pos: int, end: int) -> None:
    assert scan(data, pos) == end


def test_the_c_scanner_is_built() -> None:
    """install.sh installs a C compiler, so a missing extension is a failed build, not a choice."""
    assert termfilter.FAST_SCAN, (
        "supervisor/console/_scan.c did not build: see the output of pip install -e ."
    )


_SCAN_BYTES = st.sampled_from(
    b"\x1b[0;:?< $/m@~chilqrtu\x7f\n\xc2\xa0\xbf\x80\x8f\x90\x9f\xc0\xc1\xc3\xdf\xe0\xe1\xed\xef\xf0\xf1\xf4\xf5\xff"
).map(lambda byte: bytes([byte]))


def _runs(lengths: st.SearchStrategy[int], alphabet: bytes) -> st.SearchStrategy[bytes]:
    """Runs of bytes from `alphabet` (a short random unit repeated: cheaper than 250 draws)."""
    units = st.lists(st.sampled_from(alphabet), min_size=1, max_size=3).map(bytes)
    return st.builds(lambda n, unit: (unit * n)[:n], lengths, units)


_params = _runs(st.one_of(st.integers(0, 3), st.integers(248, 252)), b"0189:;")
_intermediates = _runs(st.integers(0, 6), b" !$/")
_csi = st.builds(
    lambda params, intermediates, final: b"\x1b[" + params + intermediates + final,
    _params,
    _intermediates,
    st.one_of(st.just(b""), st.integers(0x20, 0x7F).map(lambda byte: bytes([byte]))),
)
_characters = st.characters(min_codepoint=0x80, exclude_categories=["Cs"]).map(lambda c: c.encode())
_lead_and_followers = st.builds(  # the edges of each lead byte's second-byte range, and truncation
    lambda lead, followers: bytes([lead]) + followers,
    st.sampled_from(b"\xc1\xc2\xc3\xdf\xe0\xe1\xec\xed\xee\xef\xf0\xf1\xf3\xf4\xf5"),
    st.lists(st.sampled_from(b"\x7f\x80\x8f\x90\x9f\xa0\xbf\xc0\x1b"), max_size=3).map(bytes),
)
_scan_inputs = st.lists(
    st.one_of(
        _SCAN_BYTES,
        _csi,
        _characters,
        _lead_and_followers,
        st.builds(lambda encoded, n: encoded[:n], _characters, st.integers(1, 3)),  # truncated
        st.binary(max_size=4),
    ),
    max_size=24,
).map(b"".join)


@st.composite
def _at_a_position(draw: st.DrawFn) -> tuple[bytes, int]:
    data = draw(_scan_inputs)
    return data, draw(st.integers(0, len(data)))


@pytest.mark.skipif(not termfilter.FAST_SCAN, reason="supervisor/console/_scan.c is not built")
@settings(max_examples=3000)
@given(case=_at_a_position())
@example(case=(b"\x1b[" + b";" * 251 + b"m", 0))
@example(case=(b"\x1b[1" + b"/" * 5 + b"m", 0))
@example(case=(b"a\xf0\x9f\x98", 0))
def test_the_c_scanner_agrees_with_the_regex(case: tuple[bytes, int]) -> None:
    from supervisor.console._scan import safe_run_end as c_scan

    data, pos = case
    expected = safe_run_end_re(data, pos)
    assert c_scan(data, pos) == expected
    # The end of a buffer that goes on (bytes end in NUL, which hides a read past the end).
    assert c_scan(memoryview(data + b"\x80\xbf\x80m")[: len(data)], pos) == expected


@pytest.mark.skipif(not termfilter.FAST_SCAN, reason="supervisor/console/_scan.c is not built")
def test_the_c_scanner_takes_any_buffer_and_checks_its_arguments() -> None:
    from supervisor.console._scan import safe_run_end as c_scan

    data = b"ab\x1b[1mc\x1b[?"
    assert c_scan(data, 0) == c_scan(bytearray(data), 0) == c_scan(memoryview(data), 0) == 7
    assert c_scan(data, len(data)) == len(data)
    for pos in (-1, len(data) + 1):
        with pytest.raises(ValueError, match="pos must be within data"):
            c_scan(data, pos)
    with pytest.raises(TypeError):
        c_scan("text", 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c_scan(data)  # type: ignore[call-arg]
