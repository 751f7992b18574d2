"""Frames outside wsproto: the shared encoder writes exactly what wsproto would, at
every length boundary, and ``MessageBound`` refuses a message from its headers."""

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol

from chatcore_server._frames import MessageBound, text_frame


def text_of(n: int) -> bytes:
    """``n`` bytes of UTF-8 text, two-byte characters but for one when ``n`` is odd."""
    payload = ("é" * (n // 2) + "a" * (n % 2)).encode()
    assert len(payload) == n
    return payload


@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_matches_wsproto(n: int) -> None:
    payload = text_of(n)
    frame = text_frame(payload)
    assert frame == bytes(
        FrameProtocol(client=False, extensions=[]).send_data(payload.decode(), fin=True)
    )
    header = len(frame) - n
    assert header == (2 if n <= 125 else 4 if n <= 65535 else 10)


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame: what ``MessageBound`` reads (zero mask key)."""
    return header(opcode, len(payload), fin=fin) + payload


def header(opcode: int, n: int, *, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if n <= 125:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + b"\0\0\0\0"


def refusal(data: bytes, chunk: int, *, max_bytes: int = 1000, fragments: int = 4) -> object:
    """Feed ``data`` in pieces of ``chunk`` bytes: the absolute offset and reason of the
    first refusal, or None."""
    bound = MessageBound(max_bytes, fragments)
    for start in range(0, len(data), chunk):
        over = bound.check(data[start : start + chunk])
        if over is not None:
            at, reason = over
            return start + at, reason
    return None


def same_at_any_chunking(data: bytes, **kwargs: int) -> object:
    """The answer for ``data``, which must not depend on how it is cut into reads."""
    whole = refusal(data, len(data) or 1, **kwargs)
    for chunk in (1, 2, 3, 7, 13):
        assert refusal(data, chunk, **kwargs) == whole, chunk
    return whole


@pytest.mark.parametrize("n", [125, 126, 65535, 65536, 64 * 1024 * 1024, 2**63])
def test_a_header_over_the_limit_is_refused_before_any_payload(n: int) -> None:
    ok = client_frame(0x1, b"x" * 100)
    data = ok + header(0x1, n)
    assert same_at_any_chunking(data, max_bytes=124) == (len(ok), "message too big")


@pytest.mark.parametrize("n", [125, 126, 65535, 65536])
def test_a_frame_of_exactly_the_limit_passes(n: int) -> None:
    data = client_frame(0x1, b"y" * n) * 3
    assert same_at_any_chunking(data, max_bytes=n) is None


def test_fragments_beyond_the_bound_are_refused_even_empty() -> None:
    first = client_frame(0x1, b"a", fin=False)
    empty = client_frame(0x0, fin=False)
    # Four frames make a message; the fifth is refused at its header.
    four = first + empty * 2 + client_frame(0x0, b"b")
    assert same_at_any_chunking(four * 3) is None
    five = first + empty * 3
    assert same_at_any_chunking(five + empty * 100) == (len(five), "message in too many fragments")


def test_each_continuation_counts_its_header() -> None:
    first = client_frame(0x1, b"a" * 988, fin=False)
    empty = client_frame(0x0, fin=False)  # 6 bytes on the wire, no payload
    # 988 + 6 + 6 = 1000: exactly the limit.
    assert same_at_any_chunking(first + empty + client_frame(0x0, b"", fin=True)) is None
    # 988 + 6 + 6 + 6 = 1006 > 1000: the third empty continuation is refused.
    assert same_at_any_chunking(first + empty * 3, fragments=64) == (
        len(first + empty * 2),
        "message too big",
    )


def test_control_frames_between_fragments_do_not_count() -> None:
    first = client_frame(0x1, b"a", fin=False)
    ping = client_frame(0x9, b"p" * 125)
    data = first + ping * 10 + client_frame(0x0, b"b", fin=False) + ping + client_frame(0x0, b"c")
    assert same_at_any_chunking(data) is None


def whole_stream(data: bytes, max_bytes: int, fragments: int) -> tuple[object, bool]:
    """The plain model: every header read from the whole stream at once. Returns the
    first refusal (offset, reason) or None, and whether the stream ends between messages."""
    pos = size = count = 0
    while len(data) - pos >= 2:
        first, second = data[pos], data[pos + 1]
        n = second & 0x7F
        extra = 2 if n == 126 else 8 if n == 127 else 0
        length = 2 + (4 if second & 0x80 else 0) + extra
        if len(data) - pos < length:
            break
        if extra:
            n = int.from_bytes(data[pos + 2 : pos + 2 + extra], "big")
        if first & 0x0F < 0x8:
            size, count = (n, 1) if first & 0x0F else (size + length + n, count + 1)
            if size > max_bytes:
                return (pos, "message too big"), False
            if count > fragments:
                return (pos, "message in too many fragments"), False
            if first & 0x80:
                size = count = 0
        pos += length + n
    return None, pos == len(data) and not count


def any_frame(opcode: int, n: int, fin: bool, masked: bool) -> bytes:
    head = header(opcode, n, fin=fin)
    if not masked:  # (a protocol error, wsproto's to refuse: the bound only counts)
        head = bytes((head[0], head[1] & 0x7F)) + head[2:-4]
    return head + b"z" * n


frames = st.builds(
    any_frame,
    st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA]),
    st.integers(0, 140) | st.sampled_from([125, 126, 127, 300, 1100]),
    st.booleans(),
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(frames, max_size=8).map(b"".join),
    st.lists(st.integers(0, 4000), max_size=6),
    st.data(),
)
def test_any_stream_at_any_cuts_is_judged_as_the_whole(
    data: bytes, cuts: list[int], draw: st.DataObject
) -> None:
    """Invariant: however a stream is cut into reads, ``check`` refuses at the
    offset and for the reason the plain model finds in the whole stream (a stream
    cut short at its end included), and says it is between messages exactly
    where the model does."""
    max_bytes = draw.draw(st.sampled_from([0, 5, 130, 1000]))
    fragments = draw.draw(st.integers(1, 4))
    expected, between = whole_stream(data, max_bytes, fragments)
    bound = MessageBound(max_bytes, fragments)
    got: object = None
    edges = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for start, stop in itertools.pairwise(edges):
        over = bound.check(data[start:stop])
        if over is not None:
            got = (start + over[0], over[1])
            break
    assert got == expected
    if expected is None:
        assert bound.between_messages is between
