"""WebSocket frames outside wsproto: shared outgoing frames, incoming size bounds.

Frames a server sends are never masked (RFC 6455, 5.1), so one message's frame
is the same bytes for every connection: fan-out builds it once here and the
writer of each recipient sends those very bytes.

Incoming frames are parsed by wsproto, which has no size limit at all: it
hands out a frame's payload piece by piece as it arrives and keeps no count
of a message's fragments. :class:`MessageBound` reads only the frame headers
of the same bytes, before wsproto sees them, so that a header announcing too
much is refused the moment it is complete, without waiting for its payload.
Everything else (pings, pongs, close frames, UTF-8, reassembly) is wsproto's.

One exception, :func:`read_text_frame`: a chat client's frames are almost
all complete, unfragmented, masked text frames of a few hundred bytes, and
wsproto's generators, buffer and per-frame objects cost more than the rest of
reading one (18% of the server's samples at 300,000 deliveries/s, 100 members).
We prefer a maintained parser, and keep it for everything that has rules to
get wrong: the peer reads a frame itself only when wsproto holds nothing (at a
frame boundary, outside a fragmented message) and the frame is the one easy
case, whole in the bytes read; any other frame, and everything after it in
that read, goes to wsproto as before. An invalid easy case (bad UTF-8, a
length not in its shortest form) is left to wsproto too, which refuses it with
its own close code. tests/server/test_fast_frames.py feeds the same bytes,
whole and byte by byte, to this path and to wsproto alone and compares what
comes out.
"""

from __future__ import annotations

import struct

__all__ = ["MessageBound", "read_text_frame", "text_frame"]

_FIN_TEXT = 0x81
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack
_SHORT_HEADS = [bytes((_FIN_TEXT, n)) for n in range(126)]  # (every frame of an ack, say)


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (already UTF-8)."""
    n = len(payload)
    if n < 126:
        return _SHORT_HEADS[n] + payload
    if n < 65536:
        return _PACK_16(_FIN_TEXT, 126, n) + payload
    return _PACK_64(_FIN_TEXT, 127, n) + payload


def read_text_frame(data: bytes, pos: int) -> tuple[str, int] | None:
    """The text of the frame at ``data[pos:]`` and where it ends, if that frame is
    a whole, final, masked text frame with no reserved bits, its length in the
    shortest form under 64 KiB, and valid UTF-8; else None (wsproto's to read).

    The caller checks sizes first (:class:`MessageBound`) and calls this only
    where wsproto holds nothing.
    """
    end = len(data)
    if end - pos < 6 or data[pos] != _FIN_TEXT:
        return None
    second = data[pos + 1]
    if second < 0x80:  # unmasked: a protocol error, for wsproto to refuse
        return None
    length = second & 0x7F
    if length < 126:
        start = pos + 6
    elif length == 126 and end - pos >= 8:
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 126:
            return None
        start = pos + 8
    else:
        return None
    stop = start + length
    if stop > end:
        return None
    key = data[start - 4 : start]
    payload = (
        int.from_bytes(data[start:stop], "little")
        ^ int.from_bytes((key * ((length >> 2) + 1))[:length], "little")
    ).to_bytes(length, "little")
    try:
        return payload.decode(), stop
    except UnicodeDecodeError:
        return None


class MessageBound:
    """Bounds on each incoming message, checked from its frame headers alone.

    A message counts the payload of all its frames plus the header (6 to 14
    bytes) of each continuation frame, so that no frame is free: empty
    continuation frames used to be kept by the server at no cost against the
    limit. It may span at most ``max_fragments`` frames (control frames in
    between do not count). ``check`` is given every byte read, in order.
    """

    __slots__ = ("max_bytes", "max_fragments", "_head", "_skip", "_size", "_fragments")

    def __init__(self, max_bytes: int, max_fragments: int) -> None:
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments
        self._head = b""  # the start of a header that the last read cut short
        self._skip = 0  # payload bytes of the current frame still to come
        self._size = 0  # what the message being received counts so far
        self._fragments = 0  # its frames so far

    @property
    def between_messages(self) -> bool:
        """Everything checked so far ended at a frame boundary outside any message."""
        return not (self._skip or self._head or self._fragments)

    def check(self, data: bytes) -> tuple[int, str] | None:
        """Where in ``data`` the first header over a bound starts and why, or None.

        The offset is negative when the header began in an earlier read. What
        comes before it is a prefix to parse as usual; then the connection is
        to be closed with 1009 and the reason returned.
        """
        # Once per read of every client, once per frame in it: locals, attributes
        # written back when the read is done, a header read where it lies in
        # ``data`` unless an earlier read cut it short.
        end = len(data)
        pos = 0
        skip = self._skip
        carried = self._head
        max_bytes, max_fragments = self.max_bytes, self.max_fragments
        while True:
            if skip:
                if skip >= end - pos:
                    self._skip = skip - (end - pos)
                    return None
                pos += skip
                skip = 0
            if pos >= end:
                self._skip = 0
                return None
            if carried:
                head = carried + data[pos : pos + 14 - len(carried)]
                at = 0
            else:
                head, at = data, pos
            have = len(head) - at
            if have < 2:
                self._head, self._skip = head[at:], 0
                return None
            second = head[at + 1]
            length = second & 0x7F
            size = (
                2
                + (4 if second & 0x80 else 0)
                + (2 if length == 126 else 8 if length == 127 else 0)
            )
            if have < size:
                self._head, self._skip = head[at : at + have], 0
                return None
            if length == 126:
                length = (head[at + 2] << 8) | head[at + 3]
            elif length == 127:
                length = int.from_bytes(head[at + 2 : at + 10], "big")
            first = head[at]
            opcode = first & 0x0F
            if opcode < 0x8:  # a data frame (control frames are wsproto's: at most 125 bytes)
                if opcode:
                    total, count = length, 1
                else:
                    total, count = self._size + size + length, self._fragments + 1
                if total > max_bytes or count > max_fragments:
                    self._size, self._fragments, self._skip = total, count, 0
                    too = (
                        "message too big" if total > max_bytes else "message in too many fragments"
                    )
                    return pos - len(carried), too
                if first & 0x80:  # FIN: the message is complete
                    total = count = 0
                self._size, self._fragments = total, count
            if carried:
                self._head = b""
                pos -= len(carried)
                carried = b""
            skip = length
            pos += size
