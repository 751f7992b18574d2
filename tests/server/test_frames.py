"""Frames outside wsproto: the shared encoder writes exactly what wsproto would, at
every length boundary, and ``MessageBound`` refuses a message from its headers."""

import struct

import pytest
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
