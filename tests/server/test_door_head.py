"""The door reads an upgrade request's head itself (``_http.read_upgrade_head``),
not with h11; anything it does not read goes to h11, which answers as ever.

Invariant: whatever the door reads, h11 reads the same way (the same target and
header fields, no body, the same bytes left over after the head), and how the
bytes are cut up changes nothing. The requests are drawn from a grammar of
acceptable upgrades with the oddities h11 treats in its own way mixed in (bare
LF line ends, folded lines, bytes outside visible ASCII, a body, no or several
Host fields, another method, path or version, a fragment).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import h11
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatcore_server._http import NEED_DATA, NOT_OURS, UpgradeHead, read_upgrade_head

MAX = 16 * 1024

GOOD = (
    b"GET /ws?user=ann&room=lobby HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)

_visible = st.binary(min_size=1, max_size=6).map(
    lambda b: bytes(0x21 + x % 94 for x in b)  # visible ASCII
)
_odd_byte = st.sampled_from([b"\x00", b"\x7f", b"\x80", b"\xff", b"\x0b", b"\x0c", b"\r", b"\n"])


def _mostly(
    good: st.SearchStrategy[bytes], odd: st.SearchStrategy[bytes]
) -> st.SearchStrategy[bytes]:
    """``good`` nine times in ten: a request has an oddity or two, not one per part."""
    return st.integers(0, 9).flatmap(lambda n: odd if n == 0 else good)


_value = _mostly(
    st.one_of(
        _visible,
        st.builds(lambda a, b: a + b" " + b, _visible, _visible),
        st.builds(lambda a, b: a + b"\t" + b, _visible, _visible),
    ),
    st.one_of(st.builds(lambda a, o, b: a + o + b, _visible, _odd_byte, _visible), st.just(b"")),
)
_name = _mostly(
    st.sampled_from([b"Upgrade", b"Connection", b"Origin", b"X-Thing", b"Sec-WebSocket-Key"]),
    st.sampled_from(
        [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Bad Name", b"", b"Caf\xe9"]
    ),
)
_ows = st.sampled_from([b"", b" ", b"\t", b"  "])
_eol = _mostly(st.just(b"\r\n"), st.sampled_from([b"\n", b"\r", b"\n\r"]))
_field = st.builds(
    lambda n, o1, v, o2, e: n + b":" + o1 + v + o2 + e, _name, _ows, _value, _ows, _eol
)
_folded = st.builds(lambda v: b" " + v + b"\r\n", _visible)  # an obsolete line fold
_line = _mostly(_field, _folded)
_request_line = st.builds(
    lambda m, t, v, e: m + b" " + t + b" " + v + e,
    _mostly(st.just(b"GET"), st.sampled_from([b"POST", b"get", b"GET "])),
    _mostly(
        st.sampled_from([b"/ws", b"/ws?user=a&room=b", b"/ws?q=%41+b&&x", b"/ws?a?b=c"]),
        st.sampled_from([b"/ws#x", b"/wsx", b"/", b"/ws?a=1#f", b"/ws?\x80", b"/ws?a b"]),
    ),
    _mostly(st.just(b"HTTP/1.1"), st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"])),
    _eol,
)
_host = _mostly(
    st.builds(lambda v: b"Host: " + v + b"\r\n", _visible), st.sampled_from([b"", b"Host:\r\n"])
)
_request = st.builds(
    lambda r, h, lines, end, rest: r + h + b"".join(lines) + end + rest,
    _request_line,
    _host,
    st.lists(_line, max_size=6),
    _mostly(st.just(b"\r\n"), st.just(b"\n")),
    st.sampled_from([b"", b"\x81\x85abcde", b"GET / HTTP/1.1\r\n\r\n"]),
)


def h11_reads(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes] | None:
    """h11's reading of ``data``: target, fields and leftover of a bodiless request."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX)
    conn.receive_data(data)
    try:
        event = conn.next_event()
        if type(event) is not h11.Request or event.method != b"GET":
            return None
        if type(conn.next_event()) is not h11.EndOfMessage:
            return None
    except h11.RemoteProtocolError:
        return None
    trailing, _ = conn.trailing_data
    return event.target, list(event.headers), bytes(trailing)


def door_reads(data: bytes, pieces: int = 1) -> UpgradeHead | bool | None:
    """The door's answer with ``data`` arriving in ``pieces`` parts, as a connection
    accumulates them (stopping at the first answer that is not NEED_DATA; the
    bytes that arrive after an upgrade go to the peer, as its ``rest`` does)."""
    size = max(1, len(data) // pieces)
    held = bytearray()
    answer: UpgradeHead | bool | None = NEED_DATA
    for i in range(0, len(data), size):
        searched = len(held)
        held += data[i : i + size]
        answer = read_upgrade_head(held, MAX, searched)
        if isinstance(answer, UpgradeHead):
            return answer._replace(rest=answer.rest + data[i + size :])
        if answer is not NEED_DATA:
            return answer
    return answer


@settings(max_examples=1500, deadline=None)
@given(_request, st.integers(1, 40))
@example(GOOD, 1)
@example(GOOD + b"\x81\x80abcd", 7)
@example(GOOD.replace(b"\r\nHost", b"\nHost"), 1)
@example(GOOD.replace(b"Upgrade: websocket", b"Upgrade: websocket\r\n  folded"), 1)
@example(GOOD.replace(b"\r\n\r\n", b"\r\nHost: again\r\n\r\n"), 1)
@example(GOOD.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\nabc"), 1)
@example(GOOD.replace(b"\r\n\r\n", b"\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"), 1)
@example(GOOD.replace(b"Host: 127.0.0.1:8000\r\n", b""), 1)
def test_what_the_door_reads_h11_reads_the_same_way(data: bytes, pieces: int) -> None:
    answer = door_reads(data, pieces)
    assert answer == door_reads(data, 1)  # however the bytes are cut up
    if isinstance(answer, UpgradeHead):
        assert h11_reads(data) == (answer.target, answer.headers, answer.rest)
        parts = urlsplit(answer.target.decode("latin-1"))  # as the task path splits it
        assert (parts.path, parts.query) == ("/ws", answer.query)
    elif answer is NEED_DATA:
        # Still waiting: h11 has no whole request either (nothing it could answer yet).
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX)
        conn.receive_data(data)
        assert conn.next_event() is h11.NEED_DATA


def test_a_plain_upgrade_is_read_with_what_follows_it() -> None:
    answer = read_upgrade_head(GOOD + b"\x81\x80abcd", MAX)
    assert isinstance(answer, UpgradeHead)
    assert answer.target == b"/ws?user=ann&room=lobby"
    assert (b"upgrade", b"websocket") in answer.headers
    assert answer.rest == b"\x81\x80abcd"


def test_half_a_head_waits_and_a_head_too_big_is_left_to_h11() -> None:
    assert read_upgrade_head(GOOD[:40], MAX) is NEED_DATA
    assert read_upgrade_head(GOOD[:40] + b"x" * MAX, MAX) is NOT_OURS
    # A head ended by bare line feeds is complete for h11: h11 answers it.
    assert read_upgrade_head(b"GET /ws HTTP/1.1\nHost: x\n\n", MAX) is NOT_OURS
