"""The peer reads whole text frames itself (``_frames.read_text_frame``) and
hands every other frame to wsproto: it must be indistinguishable from wsproto.

Invariant: for any bytes a client may send (valid frames, fragments, control
frames, bad UTF-8, unmasked frames, reserved bits, lengths in a longer form
than needed, frames over the size bound), fed whole, byte by byte or cut
anywhere, the owner hears exactly what it hears from a peer that lets wsproto
read everything (the plain model): the same texts, pings, closes and refusals
in the same order, and the peer queues the same bytes back.
"""

from __future__ import annotations

import struct
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st
from wsproto.events import TextMessage

from chatcore_server._frames import read_text_frame
from chatcore_server._peer import Peer

from .test_peer import linked


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    key: bytes = b"\x11\x22\x33\x44",
    long_form: int = 0,
) -> bytes:
    """One client frame, built by hand so that it can be wrong in any way."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126 and not long_form:
        head += bytes([mask_bit | n])
    elif n < 65536 and long_form != 8:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + key + body


texts = st.text(max_size=300).map(str.encode)
bad_utf8 = st.sampled_from([b"\xff", b"ok\xc3", b"\xed\xa0\x80", b"caf\xc3\xa9\x80"])
frames = st.one_of(
    # Mostly what a chat client sends: whole text frames.
    st.builds(frame, st.just(1), texts, key=st.binary(min_size=4, max_size=4)),
    st.builds(frame, st.just(1), texts, key=st.binary(min_size=4, max_size=4)),
    st.builds(frame, st.just(1), texts, fin=st.booleans()),
    st.builds(frame, st.just(0), texts, fin=st.booleans()),  # continuations
    st.builds(frame, st.just(1), bad_utf8),
    st.builds(frame, st.sampled_from([9, 10]), st.binary(max_size=20)),  # ping, pong
    st.builds(frame, st.just(8), st.sampled_from([b"", b"\x03\xe8bye", b"\x03"])),
    st.builds(frame, st.sampled_from([2, 3]), st.binary(max_size=10)),  # binary, reserved
    st.builds(frame, st.just(1), texts, masked=st.just(False)),
    st.builds(frame, st.just(1), texts, rsv=st.integers(1, 7)),
    st.builds(frame, st.just(1), texts, long_form=st.sampled_from([2, 8])),
    st.builds(frame, st.just(1), st.binary(min_size=1100, max_size=1200)),  # over the bound
)


def heard(data: bytes, cuts: list[int], *, fast: bool) -> tuple[object, ...]:
    """What a peer's owner hears of ``data`` fed in pieces cut at ``cuts``, and
    the bytes the peer queued back."""
    peer, owner, _ = linked()
    log: list[tuple[str, object]] = []
    owner.peer_received = lambda _peer, text: log.append(("text", text))  # type: ignore[method-assign]
    left = owner.peer_left

    def peer_left(p: Peer, code: int) -> None:
        p.closing = True  # as the server's does: the engine forgets the connection
        left(p, code)

    owner.peer_left = peer_left  # type: ignore[method-assign]
    reader = read_text_frame if fast else (lambda data, pos: None)
    with mock.patch("chatcore_server._peer.read_text_frame", reader):
        start = 0
        for cut in [*sorted(set(cuts)), len(data)]:
            if start < cut <= len(data):
                peer.feed(data[start:cut])
                start = cut
    return (log, owner.alive, owner.left, [r[0] for r in owner.refused], b"".join(peer.out))


@settings(max_examples=400, deadline=None)
# A fragment, then a whole text frame in the next read: wsproto must see it (1002).
@example([frame(1, b"a", fin=False), frame(1, b"b")], [], [1])
@given(
    st.lists(frames, max_size=8),
    st.lists(st.integers(0, 3000), max_size=6),
    st.lists(st.integers(1, 8), max_size=4),
)
def test_the_peer_hears_what_wsproto_alone_hears(
    parts: list[bytes], cuts: list[int], between: list[int]
) -> None:
    data = b"".join(parts)
    # Reads that end between frames too (where the peer may read frames itself).
    cuts = cuts + [len(b"".join(parts[:n])) for n in between]
    model = heard(data, [], fast=False)
    assert heard(data, [], fast=True) == model
    assert heard(data, cuts, fast=True) == heard(data, cuts, fast=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(frames, max_size=4))
def test_byte_by_byte_is_the_same_as_whole(parts: list[bytes]) -> None:
    data = b"".join(parts)
    bytewise = heard(data, list(range(len(data))), fast=True)
    assert bytewise == heard(data, list(range(len(data))), fast=False)
    # The same texts and close codes as fed whole (only wsproto's wording of a UTF-8
    # error, which names a position in what it was given, depends on the cuts).
    assert bytewise[:4] == heard(data, [], fast=False)[:4]


def test_the_easy_case_is_read_without_wsproto() -> None:
    peer, owner, client = linked()
    data = b"".join(client.send(TextMessage(data=t)) for t in ("hi", "é" * 100, ""))
    with mock.patch.object(peer.ws, "receive_data", side_effect=AssertionError("wsproto read")):
        peer.feed(data)
    assert owner.received == ["hi", "é" * 100, ""]


def test_after_a_fragment_wsproto_reads_until_the_message_ends() -> None:
    peer, owner, client = linked()
    peer.feed(client.send(TextMessage(data="a", message_finished=False)))
    assert not peer.between  # wsproto holds the start of a message
    peer.feed(client.send(TextMessage(data="b")) + client.send(TextMessage(data="c")))
    assert owner.received == ["ab", "c"]
    assert peer.between


def test_a_peer_closed_by_its_owner_reads_no_more_text() -> None:
    peer, owner, client = linked()
    closing: list[str] = []

    def received(p: Peer, text: str) -> None:
        closing.append(text)
        p.close(1008, "enough")

    owner.peer_received = received  # type: ignore[method-assign]
    peer.feed(client.send(TextMessage(data="one")) + client.send(TextMessage(data="two")))
    assert closing == ["one"]
