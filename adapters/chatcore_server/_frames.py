"""Server-side WebSocket frames built once and shared by every recipient.

Frames a server sends are never masked (RFC 6455, 5.1), so one message's frame
is the same bytes for every connection: fan-out builds it once here and the
writer of each recipient sends those very bytes. Everything else on the wire
(pings, pongs, close frames, reading) goes through wsproto.
"""

from __future__ import annotations

import struct

__all__ = ["text_frame"]

_FIN_TEXT = 0x81
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame carrying ``payload`` (already UTF-8)."""
    n = len(payload)
    if n < 126:
        return bytes((_FIN_TEXT, n)) + payload
    if n < 65536:
        return _PACK_16(_FIN_TEXT, 126, n) + payload
    return _PACK_64(_FIN_TEXT, 127, n) + payload
